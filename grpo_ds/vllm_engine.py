"""The vLLM rollout engine (`--rollout_engine vllm`, docs/VLLM.md): a client of scripts/vllm_serve.py, which runs
vLLM in an environment of its own (its transformers pin differs from grpo_ds's). This module never imports vllm;
it speaks HTTP with the standard library and moves weights in the safetensors format.

Two jobs:
- decode(): the same contract as the static engine's (generation.generate calls it): prompts as token ids, G
  completions each, the sampled tokens' log-probs under the distribution they were drawn from (vLLM's
  `processed_logprobs`: after temperature and top-p, as grpo_ds's own engines record them).
- sync_weights(): after every update, the policy's weights in Hugging Face naming, streamed in buckets that the
  server loads with the model's own load_weights. ZeRO-2: rank 0 holds every parameter and sends them; ZeRO-3:
  all ranks gather one bucket at a time (distributed.gathered_in_buckets), rank 0 sends it, so no device ever
  holds the whole model; LoRA: each adapted layer is sent merged, W + scale * B @ A, computed into a temporary
  tensor (the frozen base is never modified, so never rounded).

Shape legend as in generation.py: B prompts, G completions per prompt, N = B * G, P prompt length, C completion.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from typing import Callable, Optional, Sequence

import torch

from . import distributed

log = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


class VLLMError(RuntimeError):
    pass


class VLLMEngine:
    """One rank's handle on the vLLM server. Every rank sends its own prompts; rank 0 alone sends weights."""

    def __init__(self, host: str, port: int, timeout: float, bucket_mb: int):
        self.url = f"http://{host}:{port}"
        self.timeout = timeout
        self.bucket_bytes = bucket_mb * 2 ** 20
        self.rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.version: Optional[int] = None  # the weights version this rank expects the server to hold
        self.synced_at: Optional[int] = None  # the policy's optimizer step count at the last sync

    # ------------------------------------------------------------------------- HTTP

    def _request(self, path: str, body: Optional[bytes] = None, content_type: str = "application/json") -> dict:
        request = urllib.request.Request(self.url + path, data=body, method="POST" if body is not None else "GET",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]
            except (ValueError, KeyError):
                pass
            raise VLLMError(f"--rollout_engine vllm: the server at {self.url} refused {path}: {detail}") from None
        except (urllib.error.URLError, OSError) as err:
            raise VLLMError(f"--vllm_server_host/--vllm_server_port: no vLLM server answers at {self.url} ({err}); "
                            f"start one with .venv-vllm/bin/python scripts/vllm_serve.py --model FOLDER "
                            f"(docs/VLLM.md)") from None

    def check(self) -> dict:
        """The server's /health (refused in one line when nothing answers); remembers its weights version."""
        health = self._request("/health")
        self.version = int(health["weights_version"])
        return health

    # ------------------------------------------------------------------------- generation

    @torch.no_grad()
    def decode(self, ids_BP: torch.Tensor, mask_BP: torch.Tensor, group_size: int, sampling, max_new_tokens: int,
               eos_ids: Sequence[int], pad_id: int,
               should_stop: Optional[Callable[[], bool]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(completion ids N x C, their sampler log-probs N x C), right-padded with pad_id / 0 to the longest
        completion; rows [b * G, (b + 1) * G) are prompt b's. With several ranks, every rank calls this together:
        rank 0 sends all ranks' prompts as one request (one vLLM batch rather than one per rank, served one after
        the other) and each rank takes its rows. The request's seed is drawn from torch's generator on rank 0
        (the trainer seeds it per step and rank), so a resumed run asks for the same samples. `should_stop` is
        checked before the request only: one request is one rollout."""
        n = ids_BP.shape[0] * group_size
        stop = should_stop is not None and should_stop()
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            stop = distributed.any_rank(stop)
        if stop:
            return ids_BP.new_full((n, 0), pad_id), torch.zeros((n, 0), dtype=torch.float32, device=ids_BP.device)
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(ids_BP.cpu(), mask_BP.cpu())]
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,)))
        all_prompts = distributed.all_gather_objects(prompts) if world > 1 else [prompts]
        reply = None
        if self.rank == 0:
            try:
                reply = self._request("/generate", json.dumps({
                    "prompts": [p for rank_prompts in all_prompts for p in rank_prompts], "n": group_size,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "max_tokens": max_new_tokens,
                    "min_tokens": max_new_tokens if sampling.fixed_length else 0, "stop_token_ids": list(eos_ids),
                    "seed": seed, "weights_version": self.version}).encode())
            except VLLMError as err:  # every rank raises it, none waits for a reply that will not come
                reply = {"error": str(err)}
        if world > 1:  # every rank gets rank 0's reply
            reply = distributed.all_gather_objects(reply)[0]
        if "error" in reply:
            raise VLLMError(reply["error"])
        first = sum(len(p) for p in all_prompts[:self.rank]) * group_size
        reply = {key: reply[key][first:first + n] for key in ("completions", "logprobs")}
        completions, logprobs = reply["completions"], reply["logprobs"]
        assert len(completions) == len(prompts) * group_size, "the server returned a different number of rows"
        width = max((len(c) for c in completions), default=0)
        ids_NC = torch.full((len(completions), width), pad_id, dtype=torch.long)
        logprobs_NC = torch.zeros((len(completions), width), dtype=torch.float32)
        for row, (ids, lps) in enumerate(zip(completions, logprobs)):
            ids_NC[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs_NC[row, :len(lps)] = torch.tensor(lps, dtype=torch.float32)
        return ids_NC.to(ids_BP.device), logprobs_NC.to(ids_BP.device)

    # ------------------------------------------------------------------------- weights

    def sync_weights(self, policy) -> dict:
        """Send the policy's current weights (a DeepSpeed engine; every rank calls this, together) unless no
        optimizer step changed them since the last sync, then wait for every rank so none generates from a
        half-updated server. Returns {"seconds", "bytes"} (rank 0's bytes; 0 on other ranks, so a sum over ranks
        is the traffic)."""
        t0 = time.perf_counter()
        if self.synced_at is not None and self.synced_at == policy.global_steps:
            return {"seconds": 0.0, "bytes": 0.0}
        version = self.version + 1
        sent = 0
        items = weight_items(policy.module)
        zero3 = distributed.is_zero3(policy)
        if self.rank == 0 or zero3:  # under ZeRO-3 every rank joins each bucket's gather; rank 0 sends
            for bucket in distributed.gathered_in_buckets(policy, items, self.bucket_bytes):
                if self.rank == 0:
                    body = _serialize({name: merge(params) for (name, merge), params in bucket})
                    self._request(f"/update_weights?version={version}&last=0", body, "application/octet-stream")
                    sent += len(body)
            if self.rank == 0:  # the closing call publishes the version and resets the prefix cache
                self._request(f"/update_weights?version={version}&last=1", _serialize({}),
                              "application/octet-stream")
        if torch.distributed.is_initialized():
            distributed.barrier()
        self.version, self.synced_at = version, policy.global_steps
        return {"seconds": time.perf_counter() - t0, "bytes": float(sent)}


def _serialize(named: dict) -> bytes:
    from safetensors.torch import save

    return save({name: t.detach().contiguous().cpu() for name, t in named.items()})


def weight_items(module) -> list:
    """[((Hugging Face name, merge), [parameters])]: what the server's load_weights expects, and the parameters
    each tensor is made of. merge(params) returns the tensor to send: the parameter itself, or for a LoRA layer
    W + scale * (B @ A) in float32, cast to W's dtype (a new tensor; W is read, never written). LoRA's own
    matrices are not sent; peft's prefix and `.base_layer` are dropped from the names."""
    lora_layers = {name: m for name, m in module.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    items = []
    for name, param in module.named_parameters():
        if ".lora_" in name:
            continue
        if ".base_layer." in name:
            prefix, leaf = name.split(".base_layer.")
            layer = lora_layers[prefix]
            if leaf == "weight" and layer.active_adapters:
                adapter = layer.active_adapters[0]
                assert len(layer.active_adapters) == 1 and not getattr(layer, "fan_in_fan_out", False), \
                    "weight sync merges one adapter of plain Linear layers"
                if adapter in layer.lora_A:
                    items.append(((_hf_name(f"{prefix}.weight"), _merger(layer.scaling[adapter])),
                                  [param, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]))
                    continue
            items.append(((_hf_name(f"{prefix}.{leaf}"), _identity), [param]))
            continue
        items.append(((_hf_name(name), _identity), [param]))
    return items


def _hf_name(name: str) -> str:
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def _identity(params: list) -> torch.Tensor:
    return params[0]


def _merger(scale: float) -> Callable[[list], torch.Tensor]:
    def merge(params: list) -> torch.Tensor:
        weight, a, b = params
        return (weight.float() + scale * (b.float() @ a.float())).to(weight.dtype)

    return merge
