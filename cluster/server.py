"""The gRPC frontend: the MoeCluster service over the coordinator's engine, plus health and reflection.

`ApiServer` listens before the engine exists, so a client can watch the health service while the
cluster starts: generation answers UNAVAILABLE and health reports NOT_SERVING until `attach_engine`
hands it an engine whose workers are all ready. A watcher keeps health in step with
``engine.ready`` afterwards (a lost worker turns it NOT_SERVING).

Each Generate/GenerateStream call validates its request (cluster.validation), submits it to the
engine and relays the engine's outputs. When the call ends early (the client cancels, its deadline
passes, the server stops) the handler's task is cancelled and the request is aborted in the engine,
which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cluster import moecluster_pb2 as pb
from cluster import moecluster_pb2_grpc as pb_grpc
from cluster.auth import BearerTokenInterceptor, server_credentials
from cluster.engine import Engine, EngineOverloaded, EngineUnavailable, InvalidRequest
from cluster.request import RequestOutput
from cluster.validation import InvalidArgument, ValidRequest, parse_generate_request, validate_generate
from workers.sampling import SamplingParams

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MoeCluster"].full_name
_FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051                # 0: any free port (ApiServer.port tells which)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    token: str | None = None         # bearer token every call but health checks must carry
    health_poll_s: float = 0.5       # how often health follows engine.ready

    def __post_init__(self) -> None:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("ServerConfig: give both tls_cert_file and tls_key_file, or neither")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"ServerConfig.port={self.port} is not a TCP port")


class MoeClusterServicer(pb_grpc.MoeClusterServicer):
    """The MoeCluster service. ``engine`` is None while the cluster starts."""

    def __init__(self) -> None:
        self.engine: Engine | None = None

    # ---- generation -----------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest | InvalidArgument,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        reply = pb.GenerateResponse()
        text: list[str] = []
        async for out in self._generate(request, context):
            reply.request_id = out.request_id
            _add_tokens(reply, out)
            text.append(out.text_delta)
        reply.text = "".join(text)
        return reply

    async def GenerateStream(self, request: pb.GenerateRequest | InvalidArgument,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        async for out in self._generate(request, context):
            reply = pb.GenerateResponse(request_id=out.request_id, text=out.text_delta)
            _add_tokens(reply, out)
            yield reply

    async def _generate(self, request: pb.GenerateRequest | InvalidArgument,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        engine = await self._engine(context)
        if isinstance(request, InvalidArgument):  # the deserializer found bad bytes
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request))
        try:
            valid = validate_generate(request, engine.model_name, engine.model_config, engine.tokenizer)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        request_id = uuid.uuid4().hex
        outputs = await self._submit(engine, valid, request_id, context)
        try:
            async for out in outputs:
                if out.error:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"request aborted: {out.error}")
                yield out
        finally:
            # Cancelled (client gone, deadline passed) or ended early: free the request's KV blocks.
            engine.abort(request_id)
            await outputs.aclose()

    async def _submit(self, engine: Engine, valid: ValidRequest, request_id: str,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[RequestOutput]:
        try:
            return engine.submit(valid.prompt_ids, valid.params, request_id)
        except InvalidRequest as e:
            field = f"sampling.{e.field}" if e.field in _SAMPLING_FIELDS else e.field
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {str(e).removeprefix(e.field + ': ')}")
        except EngineOverloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request queue is full: {e}")
        except EngineUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the cluster is not serving: {e}")
        raise AssertionError("unreachable: context.abort raises")

    async def _engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the cluster is starting; retry when health is SERVING")
        return self.engine

    # ---- metadata -------------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> pb.ListModelsResponse:
        engine = await self._engine(context)
        return pb.ListModelsResponse(models=[model_info(engine)])

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        engine = await self._engine(context)
        if request.name and request.name != engine.model_name:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"name: unknown model {request.name!r}; this server serves {engine.model_name!r}")
        return model_info(engine)

    async def GetClusterStatus(self, request: pb.GetClusterStatusRequest,
                               context: grpc.aio.ServicerContext) -> pb.ClusterStatus:
        engine = await self._engine(context)
        return cluster_status(engine)


def _add_tokens(reply: pb.GenerateResponse, out: RequestOutput) -> None:
    """Append an engine output's tokens (and logprobs) to a reply; set its finish reason and usage."""
    reply.token_ids.extend(out.new_token_ids)
    if out.logprobs is not None:
        tops = out.top_logprobs or [[] for _ in out.logprobs]
        for token, logprob, top in zip(out.new_token_ids, out.logprobs, tops, strict=True):
            reply.logprobs.add(token_id=token, logprob=logprob,
                               top_logprobs=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in top])
    reply.finish_reason = _FINISH_REASONS[out.finish_reason]
    reply.usage.prompt_tokens = out.prompt_tokens
    reply.usage.completion_tokens = out.completion_tokens
    reply.usage.total_tokens = out.prompt_tokens + out.completion_tokens


def model_info(engine: Engine) -> pb.ModelInfo:
    config = engine.model_config
    counts = config.parameter_counts()
    architecture = "Glm4MoeForCausalLM"
    config_file = engine.tokenizer.folder / "config.json"
    if config_file.is_file():
        architecture = (json.loads(config_file.read_text()).get("architectures") or [architecture])[0]
    return pb.ModelInfo(
        name=engine.model_name, architecture=architecture, model_type=config.model_type,
        context_length=config.max_position_embeddings,
        parameters=pb.ParameterCounts(total=counts["total"], active=counts["active"],
                                      routed_experts=counts["routed_experts"], mtp=counts["mtp"]),
        vocab_size=config.vocab_size, num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
        n_routed_experts=config.n_routed_experts, num_experts_per_tok=config.num_experts_per_tok,
        dtype=str(config.torch_dtype))


def cluster_status(engine: Engine) -> pb.ClusterStatus:
    status: dict[str, Any] = engine.status()
    placement = status["placement"]
    return pb.ClusterStatus(
        ready=status["ready"], model=status["model"],
        workers=[pb.WorkerStatus(role=w["role"], index=w["index"], node_id=str(w.get("node_id", "")),
                                 state=w.get("state", ""), load=float(w.get("load") or 0.0))
                 for w in status["workers"]],
        placement=pb.Placement(version=placement["version"], num_expert_workers=placement["num_workers"],
                               experts=[pb.ExpertReplicas(workers=ws) for ws in placement["replicas"]]),
        kv=[pb.KvUsage(worker=kv["worker"], num_blocks=kv["num_blocks"], free_blocks=kv["free_blocks"],
                       block_size_tokens=engine.scheduler.block_size_tokens) for kv in status["kv"]],
        queue=pb.QueueStatus(waiting=status["queue"]["waiting"], running=status["queue"]["running"],
                             max_waiting=engine.scheduler.config.max_waiting_requests),
    )


def _service_handler(servicer: MoeClusterServicer) -> grpc.GenericRpcHandler:
    """The service's method handlers; generation parses requests with `parse_generate_request` so bad
    UTF-8 is answered as INVALID_ARGUMENT naming the field, not as a parse failure."""
    def unary(method: Any, request_cls: Any, response_cls: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(method, request_deserializer=request_cls.FromString,
                                                   response_serializer=response_cls.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        "Generate": grpc.unary_unary_rpc_method_handler(
            servicer.Generate, request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(
            servicer.GenerateStream, request_deserializer=parse_generate_request,
            response_serializer=pb.GenerateResponse.SerializeToString),
        "ListModels": unary(servicer.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
        "GetModelInfo": unary(servicer.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
        "GetClusterStatus": unary(servicer.GetClusterStatus, pb.GetClusterStatusRequest, pb.ClusterStatus),
    })


class ApiServer:
    """The gRPC server: MoeCluster, grpc.health.v1 and reflection, with optional TLS and token."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.servicer = MoeClusterServicer()
        self.health = HealthServicer()
        interceptors = [BearerTokenInterceptor(config.token)] if config.token else []
        self._server = grpc.aio.server(interceptors=interceptors)
        self._server.add_generic_rpc_handlers((_service_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server)
        self.port = 0
        self._watch_task: asyncio.Task | None = None
        self._serving: bool | None = None

    @property
    def tls(self) -> bool:
        return self.config.tls_cert_file is not None

    async def start(self) -> int:
        """Listen (health NOT_SERVING until an engine is attached and ready); returns the port."""
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        if self.tls:
            self.port = self._server.add_secure_port(address, server_credentials(cfg.tls_cert_file, cfg.tls_key_file))
        else:
            self.port = self._server.add_insecure_port(address)
        await self._set_serving(False)
        await self._server.start()
        log.info("gRPC API on %s:%d%s", cfg.host, self.port, " (TLS)" if self.tls else "")
        return self.port

    async def attach_engine(self, engine: Engine) -> None:
        """Serve requests with ``engine`` (started); health follows ``engine.ready`` from now on."""
        self.servicer.engine = engine
        await self._set_serving(engine.ready)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(engine), name="moecluster-health")

    async def _watch(self, engine: Engine) -> None:
        while True:
            await self._set_serving(engine.ready)
            await asyncio.sleep(self.config.health_poll_s)

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Report NOT_SERVING, refuse new calls, let calls in flight finish for ``grace_s``, then cancel them."""
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
            self._watch_task = None
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace_s)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
