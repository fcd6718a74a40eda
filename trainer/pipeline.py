"""TorchRec's sparse-data-distribution pipeline inside Lightning's training loop.

``TrainPipelineSparseDist`` hides the input all-to-alls of the sharded embedding modules behind
compute: while batch ``i`` runs forward and backward, batch ``i + 1``'s ids are already being
redistributed to the ranks that own their rows (and batch ``i + 2`` copied to the device). Its
``progress()`` also runs backward and ``optimizer.step()``, which would take gradient clipping,
LR schedulers and ``accumulate_grad_batches`` away from Lightning. :class:`SparseDistPipeline`
keeps TorchRec's stage order but stops after the forward pass: ``step()`` returns the loss of batch
``i`` to Lightning's automatic optimization, which runs backward (the fused embedding optimizers
step inside it) and the dense optimizer as for any other module.

The pipeline finds the sharded modules' inputs by FX-tracing the model's ``forward`` with its
arguments bound to attributes of the batch (:class:`PipelineInput`), so the LightningModule
declares that mapping (``ShardedModule.pipeline_inputs``). A module whose sharded inputs are
computed inside ``forward`` is not pipelined (TorchRec runs it unpipelined).

On CUDA the stages run on their own streams; on CPU TorchRec creates no streams and the same code
runs the stages in order, which is how the CPU tests prove the pipelined path trains exactly like
the plain one.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.fx._symbolic_trace import PHWithMeta
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.streamable import Pipelineable

log = logging.getLogger(__name__)


class PipelineInput(Pipelineable):
    """A training batch plus where each ``forward`` argument of the sharded model lives in it.

    ``arg_paths`` maps a parameter name of the model's ``forward`` to an attribute path of the
    batch (``{"sparse": "sparse_features"}``); TorchRec's tracer reads it through
    :meth:`to_proxy_tuple` to find which batch field feeds each sharded module.
    """

    def __init__(self, batch: Any, arg_paths: dict[str, str]) -> None:
        self.batch = batch
        self.arg_paths = arg_paths

    def to(self, device: torch.device, non_blocking: bool = False, **_: Any) -> PipelineInput:
        return PipelineInput(self.batch.to(device=device, non_blocking=non_blocking), self.arg_paths)

    def record_stream(self, stream: torch.Stream) -> None:
        self.batch.record_stream(stream)

    def pin_memory(self) -> PipelineInput:
        return PipelineInput(self.batch.pin_memory(), self.arg_paths)

    def to_proxy_tuple(self, model: torch.nn.Module) -> dict[str, Any]:
        # placeholders carrying the attribute path: TorchRec turns "batch.sparse_features" into
        # getattr steps applied to the PipelineInput of each pipelined batch. Other parameters with
        # a default are traced at it (a flag may steer Python control flow, which FX cannot trace);
        # the trace only locates the sharded modules' inputs, the model still runs its own forward.
        args: dict[str, Any] = {
            name: p.default
            for name, p in inspect.signature(model.forward).parameters.items()
            if name not in self.arg_paths and p.default is not inspect.Parameter.empty
        }
        args.update({param: PHWithMeta(ph_key=f"batch.{path}") for param, path in self.arg_paths.items()})
        return args


class SparseDistPipeline(TrainPipelineSparseDist[PipelineInput, Any]):
    """``TrainPipelineSparseDist`` whose step ends at the loss; Lightning does backward and step.

    ``loss_fn(batch)`` computes the training loss of one (unwrapped, on-device) batch by calling
    the sharded model with the batch fields declared in ``arg_paths``.
    """

    def __init__(
        self,
        model: DistributedModelParallel,
        device: torch.device,
        batches: Iterable[Any],
        arg_paths: dict[str, str],
        loss_fn: Callable[[Any], torch.Tensor],
    ) -> None:
        super().__init__(
            model,
            optimizer=None,  # type: ignore[arg-type]  # Lightning steps the dense optimizer
            device=device,
            execute_all_batches=True,
            custom_model_fwd=lambda inp: (loss_fn(inp.batch), None),
        )
        self._inputs: Iterator[PipelineInput] = (PipelineInput(b, arg_paths) for b in batches)
        self._forwarded = False  # batches[0] has been through forward; pop it on the next step

    @property
    def current_batch(self) -> Any:
        """The (unwrapped) batch of the last ``step()``."""
        return self.batches[0].batch if self.batches and self.batches[0] is not None else None

    def step(self) -> torch.Tensor:
        """Forward of the next batch, with the following batch's input distribution started first."""
        if self._forwarded:
            self.dequeue_batch()  # its backward and optimizer step ran in Lightning since
            self._forwarded = False
        self.fill_pipeline(self._inputs)
        if not self.batches:
            raise RuntimeError("the training data ran out before Lightning's epoch ended")
        self._set_module_context(self.contexts[0])
        self._wait_for_batch()
        if len(self.batches) >= 2:
            self.start_sparse_data_dist(self.batches[1], self.contexts[1])
        self.enqueue_batch(self._inputs)
        loss, _ = self._model_fwd(self.batches[0])
        if len(self.batches) >= 2:
            self.wait_sparse_data_dist(self.contexts[1])
        self._forwarded = True
        return loss

    def close(self) -> None:
        """Finish in-flight input distributions and give the model its own forwards back.

        Called before evaluation or when training stops: the batches fetched ahead are dropped
        (training resumes from the first untrained batch with a new pipeline), but every rank has
        started their all-to-alls, so they are completed here rather than abandoned mid-flight.
        """
        for context in self.contexts:
            if context.fused_splits_awaitables:
                self.wait_sparse_data_dist(context)
            for request in context.input_dist_tensors_requests.values():
                request.wait()
            context.input_dist_tensors_requests.clear()
        self.detach()
        self.reset()
