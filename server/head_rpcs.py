"""The head RPCs (PutHead, ListHeads, DeleteHead, Predict): per-tenant heads, run in threads beside the loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import fnmatch
import functools
import logging
import os
import time

import numpy as np

from featurebank.common import tensors
from featurebank.common.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from featurebank.server.auth import current_tenant
from featurebank.server.heads import CompiledHead
from featurebank.server.heads import parse_ref as parse_head_ref
from featurebank.v1 import featurebank_pb2 as pb

logger = logging.getLogger(__name__)

HEAD_THREADS = min(2, os.cpu_count() or 1)  # Predicts' head numpy (BLAS may add its own threads)


class HeadRPCs:
    """The head half of FeatureBankServicer, which provides ``heads`` (a HeadStore), ``head_limits``,
    ``_compiled_heads`` (a CompiledHeadCache), ``_head_threads``, ``backbones``, ``metrics`` and
    ``extract``."""

    def _check_head(self, ref: str, *, write: bool = False) -> tuple[str, str, str]:
        """(tenant, name, how the caller names it) of a head reference the caller may use.

        ``NAME`` is the caller's own head, ``TENANT/NAME`` another tenant's (run and listed only,
        where a ``heads`` pattern of the caller grants it); without tokens there is one namespace.
        """
        owner, name = parse_head_ref(ref)
        tenant = current_tenant.get()
        if tenant is None:
            if owner is not None:
                raise InvalidArgumentError(
                    f"head {ref!r}: TENANT/NAME needs tenants (--tokens-file); name the head alone"
                )
            return "", name, name
        owner = tenant.name if owner is None else owner
        tenant.check_head(owner, name, write=write)
        return owner, name, name if owner == tenant.name else f"{owner}/{name}"

    async def _run_head(self, fn, *args):
        """Head numpy (compiling, predicting) runs in threads: the event loop keeps serving meanwhile."""
        if self._head_threads is None:
            self._head_threads = concurrent.futures.ThreadPoolExecutor(HEAD_THREADS, thread_name_prefix="fb-heads")
        return await asyncio.get_running_loop().run_in_executor(self._head_threads, functools.partial(fn, *args))

    async def _compiled_head(self, owner: str, name: str, version: int) -> CompiledHead:
        version = await self.heads.resolve(owner, name, version)  # also sees another replica's delete
        compiled = self._compiled_heads.get((owner, name, version))
        if compiled is None:
            head = await self.heads.read(owner, name, version)
            if head is None:
                raise NotFoundError(f"no head {name!r} version {version}")
            compiled = await self._run_head(CompiledHead, head, self.head_limits)
            self._compiled_heads.put((owner, name, version), compiled)
        return compiled

    async def PutHead(self, request: pb.PutHeadRequest, context) -> pb.HeadInfo:
        owner, name, shown = self._check_head(request.head.name, write=True)
        if request.head.version < 0:
            raise InvalidArgumentError("head version must be >= 0 (0: the next one)")
        head = pb.Head()
        head.CopyFrom(request.head)
        head.name = name
        compiled = await self._run_head(CompiledHead, head, self.head_limits)  # validates before anything is stored
        served = self.backbones.get(head.backbone)
        if served is not None:
            dim = served.layers.get(head.layer)
            if dim is None:
                raise NotFoundError(f"backbone {head.backbone!r} has no layer {head.layer!r}")
            if int(np.prod(dim)) != compiled.input_dim:
                raise InvalidArgumentError(
                    f"head takes {compiled.input_dim} features but {head.backbone}/{head.layer} gives {int(np.prod(dim))}"
                )
        if not head.created_unix_ms:
            head.created_unix_ms = int(time.time() * 1000)
        head.version = await self.heads.create(owner, head)
        self._compiled_heads.put((owner, name, head.version), compiled)  # write-once: this is that version for good
        logger.info(
            "stored head %s v%d (%s on %s/%s, %d parameters)%s",
            name,
            head.version,
            head.kind,
            head.backbone,
            head.layer,
            compiled.parameters,
            f" of tenant {owner}" if owner else "",
        )
        return compiled.info(shown)

    async def ListHeads(self, request: pb.ListHeadsRequest, context) -> pb.ListHeadsResponse:
        response = pb.ListHeadsResponse()
        if request.name:
            owner, name, shown = self._check_head(request.name)  # validated before any store is asked
            listed = [(owner, name, shown)]
        else:  # the caller's own heads, then those it is granted: indexes, never a scan of the store
            tenant = current_tenant.get()
            owner = tenant.name if tenant is not None else ""
            listed = [
                (owner, n, n) for n in await self.heads.names(owner) if tenant is None or tenant.may_use_head(owner, n)
            ]
            grants = tenant.head_grants if tenant is not None else ()
            for other in await self.heads.owners() if grants else ():
                if other != owner and any(fnmatch.fnmatchcase(other, g.partition("/")[0]) for g in grants):
                    listed += [
                        (other, n, f"{other}/{n}")
                        for n in await self.heads.names(other)
                        if tenant.may_use_head(other, n)
                    ]
        for owner, name, shown in listed:
            for info in await self.heads.infos(owner, name):
                info.name = shown
                response.heads.append(info)
        return response

    async def DeleteHead(self, request: pb.DeleteHeadRequest, context) -> pb.DeleteHeadResponse:
        owner, name, _ = self._check_head(request.name, write=True)
        deleted = await self.heads.remove(owner, name, request.version)
        self._compiled_heads.discard(owner, name, request.version)
        if not deleted:
            raise NotFoundError(
                f"no head {request.name!r}" + (f" version {request.version}" if request.version else "")
            )
        return pb.DeleteHeadResponse(deleted=deleted)

    async def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        owner, name, shown = self._check_head(request.head)
        compiled = await self._compiled_head(owner, name, request.version)
        head = compiled.head
        served = self.backbones.get(head.backbone)
        if served is None:
            raise FailedPreconditionError(
                f"head {shown!r} needs backbone {head.backbone!r}, which this server does not serve"
            )
        if served.info.fingerprint != head.backbone_fingerprint:
            raise FailedPreconditionError(
                f"head {shown!r} v{head.version} was trained on {head.backbone} fingerprint "
                f"{head.backbone_fingerprint[:16]}, but the served one is {served.info.fingerprint[:16]}: retrain it"
            )
        start = time.perf_counter()
        extracted = await self.extract(
            pb.ExtractRequest(
                backbone=head.backbone, layer=head.layer, inputs=request.inputs, cache_policy=request.cache_policy
            ),
            context,
        )
        response = pb.PredictResponse(head=shown, version=head.version)
        ok = []
        for r in extracted.results:
            p = response.predictions.add(key=r.key, cache_hit=r.cache_hit)
            if r.HasField("error"):
                p.error.CopyFrom(r.error)
            else:
                ok.append((p, tensors.from_proto(r.features).reshape(-1)))
        if ok:
            features = np.stack([x for _, x in ok]).astype(np.float32)
            if features.shape[1] != compiled.input_dim:
                raise FailedPreconditionError(
                    f"head {shown!r} v{head.version} takes {compiled.input_dim} features but "
                    f"{head.backbone}/{head.layer} gives {features.shape[1]}"
                )
            probs = await self._run_head(compiled.predict, features)
            names = list(head.class_names)
            for (p, _), row in zip(ok, probs):
                tensors.to_proto(row, p.probabilities)
                p.label_index = int(row.argmax())
                p.label = names[p.label_index] if p.label_index < len(names) else str(p.label_index)
        labels = (f"{owner}/{name}" if owner else name, str(head.version))
        self.metrics.head_predictions.labels(*labels).inc(len(ok))
        self.metrics.head_duration.labels(*labels).observe(time.perf_counter() - start)
        return response
