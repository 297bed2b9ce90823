"""The implementations under test (``--impls``), each built on the same inputs and timed the same way.

    ours, ours+compile  xlsr's Wav2Vec2Model (+ compile_encoder()); train loss: xlsr.pretrain.loss.compute_loss;
                        fine-tuning: xlsr.Wav2Vec2ForCTC and its ctc_loss
                        classification: xlsr.Wav2Vec2ForSequenceClassification, cross entropy
    hf                  transformers' Wav2Vec2Model (inference) / Wav2Vec2ForPreTraining (train) /
                        Wav2Vec2ForCTC with freeze_feature_encoder() (fine-tuning) /
                        Wav2Vec2ForSequenceClassification with freeze_feature_encoder() (classification), SDPA attention
    fairseq             fairseq's own Wav2Vec2Model (``--fairseq-path``, benchmarks/README.md) and its criterion
                        (pretraining and inference only)

``make_inputs`` (xlsr/workloads.py) writes the shared inputs (audio, span mask, negatives; CTC targets for
fine-tuning, class labels for classification), ``save_classifier`` the classifier weights both implementations of
the classification step load,
``make_runner`` builds one implementation for one workload spec; its ``step()`` times one repetition (inference,
or a train step with the optimiser).
Everything heavy (torch, xlsr, transformers, fairseq) is imported inside the functions, in the worker processes.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time

from xlsr.workloads import classification_config, ctc_config



def save_classifier(cfg, folder: str, seed: int = 0) -> dict[str, str]:
    """A randomly initialised classifier of the classification workload, written twice into ``folder``: ours
    (``native/``, read by ours) and as an HF folder (``hf/``, our exporter, read by transformers), so both
    implementations start from the same weights. Returns ``{"ours": path, "hf": path}``."""
    import torch

    import xlsr

    torch.manual_seed(seed)
    model = xlsr.Wav2Vec2ForSequenceClassification(classification_config(cfg))
    paths = {"ours": os.path.join(folder, "native"), "hf": os.path.join(folder, "hf")}
    model.save_pretrained(paths["ours"])
    model.save_pretrained(paths["hf"], huggingface=True)
    return paths


def hf_config(cfg):
    """The transformers ``Wav2Vec2Config`` with the same architecture as our ``cfg`` (our HF exporter's mapping)."""
    from transformers import Wav2Vec2Config as HFConfig

    from xlsr.checkpoints.huggingface import config_to_huggingface

    return HFConfig.from_dict(config_to_huggingface(cfg))


def fairseq_model(cfg, fairseq_path: str):
    """fairseq's own Wav2Vec2Model with our config's architecture (fairseq and our config share field names).

    ``fairseq_path``: extra import locations (os.pathsep-separated), appended to sys.path, e.g. an unpacked
    fairseq source tree and a ``pip install --target`` folder with what it imports (bitarray, sacrebleu, sklearn).
    """
    import dataclasses

    for entry in filter(None, fairseq_path.split(os.pathsep)):
        sys.path.append(entry)
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Config as FairseqConfig
    from fairseq.models.wav2vec.wav2vec2 import Wav2Vec2Model as FairseqModel

    from xlsr.checkpoints.fairseq import config_to_fairseq

    fields = {f.name for f in dataclasses.fields(FairseqConfig)}
    values = {key: value for key, value in config_to_fairseq(cfg).items() if key in fields}
    return FairseqModel(FairseqConfig(**values))


def fairseq_importable(fairseq_path: str) -> bool:
    """Whether fairseq's wav2vec 2.0 model imports (in a child process: its import is slow and noisy)."""
    code = ("import os, sys; sys.path += [p for p in sys.argv[1].split(os.pathsep) if p]; "
            "import fairseq.models.wav2vec.wav2vec2")
    result = subprocess.run([sys.executable, "-c", code, fairseq_path], capture_output=True, text=True)
    return result.returncode == 0


def make_optimizer(params, name: str, device):
    """AdamW (lr 1e-5) in the ``--optim`` variant: fused (else foreach where fused is unavailable), foreach, plain."""
    import torch

    if name == "fused":
        try:
            return torch.optim.AdamW(params, lr=1e-5, fused=True)
        except (RuntimeError, TypeError, ValueError):
            name = "foreach"
    if name == "foreach":
        return torch.optim.AdamW(params, lr=1e-5, foreach=True)
    return torch.optim.AdamW(params, lr=1e-5, foreach=False)


class Runner:
    """One implementation on one workload: build, then ``step()`` runs one timed repetition.

    A subclass builds its model (``build``) and says what one inference (``features``) and one training loss
    (``loss``) are; this class moves the inputs to the device and adds autocast, the optimiser and the timing.
    """

    def __init__(self, impl: str, spec: dict, inputs: dict):
        import torch

        self.torch = torch
        self.impl = impl
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.bf16 = spec["bf16"]
        self.finetune = spec["kind"] == "finetune"
        self.classify = spec["kind"] == "classify"
        self.train = spec["kind"] in ("train", "finetune", "classify")
        torch.manual_seed(0)
        import xlsr

        cfg = xlsr.Wav2Vec2Config.from_preset(spec["preset"])
        self.source, self.mask, self.negatives = (inputs[key].to(self.device) for key in ("source", "mask", "negatives"))
        self.targets = inputs["targets"].to(self.device) if "targets" in inputs else None
        self.target_lengths = inputs["target_lengths"].to(self.device) if "target_lengths" in inputs else None
        self.class_labels = inputs["class_labels"].to(self.device) if "class_labels" in inputs else None
        model = self.build(cfg)
        self.model = model.to(self.device).train(self.train)
        self.optimizer = None
        self.step_in_backward = None
        if self.train:
            # the trainable parameters (HF's frozen conv stack has requires_grad False, HF Trainer leaves it out;
            # ours keeps requires_grad and gets no gradient, so AdamW skips it)
            params = [p for p in model.parameters() if p.requires_grad]
            self.optimizer = make_optimizer(params, spec["optim"], self.device)
            if spec.get("step_in_backward"):  # as the trainer sets it up
                from xlsr.training.optim import attach_step_in_backward

                self.step_in_backward = attach_step_in_backward(self.optimizer, model.parameters(), self.device)

    def build(self, cfg):
        """The implementation's model for our config ``cfg`` (on the CPU; the caller moves it)."""
        raise NotImplementedError

    def features(self):
        """One inference forward: the last layer's output."""
        raise NotImplementedError

    def loss(self):
        """One training forward with ``self.mask`` (and ``self.negatives``): the pretraining loss; for fine-tuning
        (``self.finetune``) the CTC loss of ``self.targets``, time masks drawn by the model itself; for classification
        (``self.classify``) the cross entropy of ``self.class_labels``, averaged over the batch."""
        raise NotImplementedError

    def check_loss(self) -> float:
        """The classification loss in eval mode (no masks, no dropout), without gradient: the same for every
        implementation given the same weights (checked by the parent before timing)."""
        self.model.eval()
        try:
            with self.torch.no_grad():
                return float(self.loss())
        finally:
            self.model.train(self.train)

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.bf16)

    def fn(self):
        """One repetition, untimed: a no-grad forward, or forward, loss, backward and optimiser step."""
        if not self.train:
            with self.torch.inference_mode(), self._autocast():
                return self.features()
        with self._autocast():
            loss = self.loss()
        loss.backward()
        if self.step_in_backward is None:  # else the backward pass has updated every parameter already
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def step(self) -> dict:
        """One timed repetition: wall and CPU seconds."""
        torch = self.torch
        gc.collect()  # no collector pause inside the timed region (same for every implementation)
        gc.disable()
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            cpu0, t0 = time.process_time(), time.perf_counter()
            out = self.fn()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            else:
                float(out.float().sum())
            wall = time.perf_counter() - t0
        finally:
            gc.enable()
        return {"time": wall, "cpu": time.process_time() - cpu0}


class OursRunner(Runner):
    """xlsr's Wav2Vec2Model; ``ours+compile`` compiles the encoder."""

    def build(self, cfg):
        import xlsr
        from xlsr.pretrain.loss import compute_loss

        self._compute_loss = compute_loss
        if self.finetune:
            model = xlsr.Wav2Vec2ForCTC(ctc_config(cfg))
            model.wav2vec2.set_activation_checkpointing(self.spec["checkpointing"])
            return model
        if self.classify:  # the weights the parent wrote (save_classifier), in our format
            model = xlsr.Wav2Vec2ForSequenceClassification.from_pretrained(self.spec["weights"]["ours"])
            model.wav2vec2.set_activation_checkpointing(self.spec["checkpointing"])
            return model
        model = xlsr.Wav2Vec2Model(cfg)
        model.set_activation_checkpointing(self.spec["checkpointing"])
        if "compile" in self.impl:
            model.compile_encoder()
        return model

    def features(self):
        return self.model.extract_features(self.source).x

    def loss(self):
        if self.finetune:
            return self.model.ctc_loss(self.model(self.source), self.targets, self.target_lengths)
        if self.classify:
            return self.torch.nn.functional.cross_entropy(self.model(self.source).logits, self.class_labels)
        out = self.model(self.source, mask_indices=self.mask, negative_indices=self.negatives)
        return self._compute_loss(out, (0.1, 0.0)).total  # XLS-R weights: contrastive + 0.1 diversity


class HFRunner(Runner):
    """transformers' Wav2Vec2Model / Wav2Vec2ForPreTraining with the same architecture, SDPA attention."""

    def build(self, cfg):
        from transformers import Wav2Vec2Config as HFConfig
        from transformers import Wav2Vec2ForCTC as HFForCTC
        from transformers import Wav2Vec2ForPreTraining
        from transformers import Wav2Vec2ForSequenceClassification as HFForClassification
        from transformers import Wav2Vec2Model as HFModel

        if self.finetune:  # our CTC config in HF's terms (vocab_size, pad_token_id = blank, ctc_* settings)
            from xlsr.checkpoints.ctc import config_to_huggingface_ctc

            ctc_cfg = ctc_config(cfg)
            vocab = [f"<{i}>" for i in range(ctc_cfg.vocab_size)]
            hf_cfg = HFConfig.from_dict(config_to_huggingface_ctc(ctc_cfg, vocab))
            hf_cfg._attn_implementation = "sdpa"
            model = HFForCTC(hf_cfg)
            model.freeze_feature_encoder()  # feature_grad_mult 0
            # HF's labels: padding -100 (its loss also drops the blank, but -100 is what its collators write)
            lengths = self.target_lengths[:, None]
            self.labels = self.targets.masked_fill(self.torch.arange(self.targets.shape[1])[None, :] >= lengths, -100)
        elif self.classify:  # the weights the parent wrote (save_classifier) through our HF exporter
            model = HFForClassification.from_pretrained(self.spec["weights"]["hf"], attn_implementation="sdpa")
            model.freeze_feature_encoder()  # feature_grad_mult 0
            self.labels = self.class_labels
        else:
            hf_cfg = hf_config(cfg)
            hf_cfg._attn_implementation = "sdpa"
            model = (Wav2Vec2ForPreTraining if self.train else HFModel)(hf_cfg)
        if self.spec["checkpointing"]:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def features(self):
        return self.model(self.source).last_hidden_state

    def loss(self):
        if self.finetune or self.classify:
            return self.model(self.source, labels=self.labels).loss
        return self.model(self.source, mask_time_indices=self.mask, sampled_negative_indices=self.negatives).loss


class FairseqRunner(Runner):
    """fairseq's own Wav2Vec2Model; it draws its own negatives and has no activation checkpointing."""

    def build(self, cfg):
        if self.spec["checkpointing"]:
            raise ValueError("fairseq's wav2vec 2.0 has no activation checkpointing option")
        if self.finetune or self.classify:
            raise ValueError("the fairseq runner has no fine-tuning steps (its Wav2VecCtc and classifier need a task)")
        model = fairseq_model(cfg, self.spec.get("fairseq_path", ""))
        model.set_num_updates(0)
        return model

    def features(self):
        return self.model(self.source, mask=False, features_only=True)["x"]

    def loss(self):
        # fairseq's wav2vec criterion: cross entropy summed over masked frames (target 0 = the positive), plus
        # 0.1 x diversity x sample size. fairseq draws its own 100 negatives per masked frame.
        F = self.torch.nn.functional
        out = self.model(self.source, mask_indices=self.mask)
        logits = self.model.get_logits(out).float()
        target = logits.new_zeros(logits.size(0), dtype=self.torch.long)
        loss = F.cross_entropy(logits, target, reduction="sum")
        return loss + 0.1 * self.model.get_extra_losses(out)[0].float() * target.numel()


RUNNERS = {"ours": OursRunner, "hf": HFRunner, "fairseq": FairseqRunner}


def make_runner(impl: str, spec: dict, inputs: dict) -> Runner:
    """The runner of ``impl`` (ours, ours+compile, hf, fairseq) for one workload ``spec`` on ``inputs``."""
    family = "ours" if impl.startswith("ours") else impl
    if family not in RUNNERS:
        raise ValueError(f"unknown implementation {impl!r}")
    return RUNNERS[family](impl, spec, inputs)
