"""Models outside the zoo, as a new user would try them: what pipec does with each, per schedule.

Every model comes from a tiny config or a few lines of PyTorch (random
weights, nothing downloaded) and none is in ``tests/zoo``. Each one goes
through three plans, all ``pipec.partition`` defaults apart from these:

``1f1b``         ``num_stages=2``
``zb-h1``        ``num_stages=2, schedule="zb-h1"``
``interleaved``  ``num_stages=4, schedule="interleaved-1f1b", stages_per_rank=2``

and, per plan, five checks:

``partition``    the plan is made (a refusal shows its error)
``save_load``    ``plan.save`` then ``pipec.load``
``grads``        one training step of the in-memory plan through the real
                 executor, every stage on one rank in this process
                 (``tests/dist/_one_rank.py``), against the reference: the
                 original model on the full batch; for BatchNorm models
                 ``loss / num_microbatches`` accumulated over the micro-batches
                 (a pipeline normalises each alone); for models drawing random
                 numbers (dropout, stochastic depth) ``pipec.reference_step``
                 with the runtime's seed
``grads_loaded`` the same step from the loaded plan
``eval``         ``pipe.eval(); pipe.forward(batch)`` against ``model.eval()(batch)``

The table shows, per model, the trace method and per schedule ``ok`` or the
failing checks, with the max relative gradient difference (over parameters:
max |pipelined - reference| / max |reference|, the latter floored at 1e-3 of
the largest gradient so a gradient that is all but zero does not dominate).
The first line of each failure follows the table.

    python benchmarks/new_models.py                # every model
    python benchmarks/new_models.py phi swin       # some
    python benchmarks/new_models.py --list
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
# the one-rank executor of the runtime tests: one copy, kept working by those tests
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "dist"))

import torch  # noqa: E402
from _one_rank import one_rank  # noqa: E402
from _table import aligned  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import pipec  # noqa: E402

BATCH = 4
SEQ = 8
VOCAB = 96
IMAGE = 32
NUM_CLASSES = 5
SEED = 1234
TOL = 1e-4  # max relative difference of gradients, losses and eval outputs
SCHEDULES: dict[str, dict[str, Any]] = {
    "1f1b": {"num_stages": 2},
    "zb-h1": {"num_stages": 2, "schedule": "zb-h1"},
    "interleaved": {"num_stages": 4, "schedule": "interleaved-1f1b", "stages_per_rank": 2},
}
CHECKS = ("partition", "save_load", "grads", "grads_loaded", "eval")


@dataclass(frozen=True)
class Case:
    """One model and one full batch. ``build()`` gives the same weights on every call;
    ``random``: the model draws random numbers in training (dropout, stochastic depth),
    so its reference is ``pipec.reference_step`` with the runtime's seed. ``eval_plan``: its
    Python skips random operations in eval (stochastic depth), which a plan traced in
    train() mode cannot follow (pipec warns), so ``eval`` checks a plan of ``model.eval()``,
    as pipec's warning advises."""

    build: Callable[[], nn.Module]
    inputs: tuple[Any, ...]
    loss_fn: Callable[..., Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    target: Any = None
    random: bool = False
    eval_plan: bool = False


# -- data and losses ---------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tokens(*shape: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=_gen(seed))


def _images(seed: int = 2, batch: int = BATCH, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=_gen(seed))


def _classes(seed: int = 3, batch: int = BATCH, classes: int = NUM_CLASSES) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=_gen(seed))


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory()

    return build


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output["logits"]


def hf_loss(output: Any) -> torch.Tensor:
    return output["loss"]


def token_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(output).flatten(0, 1), target.flatten())


def class_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_logits(output), target)


def pooled_loss(output: Any) -> torch.Tensor:
    return output["pooler_output"].pow(2).mean()


# -- Hugging Face models (imported when a case is built: transformers is slow to import)
def _decoder(config_name: str, model_name: str, **config: Any) -> Case:
    import transformers

    cfg = getattr(transformers, config_name)(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=2 * SEQ, use_cache=False, **config)
    model_cls = getattr(transformers, model_name)
    tokens = _tokens(BATCH, SEQ + 1, seed=8)
    return Case(_seeded(lambda: model_cls(cfg)), (tokens[:, :-1],), token_loss, target=tokens[:, 1:])


def gpt_neox() -> Case:
    return _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_dropout=0.0, attention_dropout=0.0)


def phi() -> Case:
    return _decoder("PhiConfig", "PhiForCausalLM", resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)


def phi3() -> Case:
    return _decoder("Phi3Config", "Phi3ForCausalLM", num_key_value_heads=2,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)


def gemma() -> Case:
    return _decoder("GemmaConfig", "GemmaForCausalLM", num_key_value_heads=2, head_dim=8)


def opt_labels() -> Case:
    import transformers

    cfg = transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=2 * SEQ, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
        use_cache=False, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    tokens = _tokens(BATCH, SEQ, seed=9)
    return Case(_seeded(lambda: transformers.OPTForCausalLM(cfg)), (tokens,), hf_loss,
                kwargs={"labels": tokens.clone()})


def bart_decoder_inputs() -> Case:
    import transformers

    cfg = transformers.BartConfig(
        encoder_layers=1, decoder_layers=1, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=2 * SEQ,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, use_cache=False,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
    return Case(_seeded(lambda: transformers.BartForConditionalGeneration(cfg)), (_tokens(BATCH, SEQ, seed=5),),
                token_loss, kwargs={"decoder_input_ids": _tokens(BATCH, SEQ - 2, seed=6)},
                target=_tokens(BATCH, SEQ - 2, seed=7))


def roberta_labels() -> Case:
    import transformers

    cfg = transformers.RobertaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=VOCAB + 3,
        max_position_embeddings=2 * SEQ + 2, num_labels=NUM_CLASSES,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    # ids from 3: RoBERTa's position ids count the tokens that are not padding (id 1)
    return Case(_seeded(lambda: transformers.RobertaForSequenceClassification(cfg)),
                (_tokens(BATCH, SEQ, seed=4) + 3,), hf_loss, kwargs={"labels": _classes()})


def whisper() -> Case:
    import transformers

    cfg = transformers.WhisperConfig(
        encoder_layers=1, decoder_layers=1, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=VOCAB, num_mel_bins=16,
        max_source_positions=16, max_target_positions=16, dropout=0.0, attention_dropout=0.0,
        activation_dropout=0.0, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[])
    features = torch.randn(BATCH, 16, 32, generator=_gen(11))  # 16 mel bins, 2 * 16 frames
    return Case(_seeded(lambda: transformers.WhisperForConditionalGeneration(cfg)), (features,), token_loss,
                kwargs={"decoder_input_ids": _tokens(BATCH, 6, seed=12)}, target=_tokens(BATCH, 6, seed=13))


def convnext() -> Case:
    import transformers

    cfg = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=NUM_CLASSES,
                                      image_size=IMAGE, drop_path_rate=0.0)
    return Case(_seeded(lambda: transformers.ConvNextForImageClassification(cfg)), (_images(),), class_loss,
                target=_classes())


def swin() -> Case:
    import transformers

    cfg = transformers.SwinConfig(
        image_size=IMAGE, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4,
        num_labels=NUM_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0.0)
    return Case(_seeded(lambda: transformers.SwinForImageClassification(cfg)), (_images(),), class_loss,
                target=_classes())


def deit() -> Case:
    import transformers

    cfg = transformers.DeiTConfig(
        image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=NUM_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Case(_seeded(lambda: transformers.DeiTForImageClassificationWithTeacher(cfg)), (_images(),),
                class_loss, target=_classes())


def clip_vision() -> Case:
    import transformers

    cfg = transformers.CLIPVisionConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, image_size=IMAGE, patch_size=8)
    return Case(_seeded(lambda: transformers.CLIPVisionModel(cfg)), (_images(),), pooled_loss)


def clip_text() -> Case:
    import transformers

    cfg = transformers.CLIPTextConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=2, vocab_size=VOCAB, max_position_embeddings=SEQ,
                                      pad_token_id=1, bos_token_id=0, eos_token_id=2)
    return Case(_seeded(lambda: transformers.CLIPTextModel(cfg)), (_tokens(BATCH, SEQ, seed=15),), pooled_loss)


def distilbert() -> Case:
    import transformers

    cfg = transformers.DistilBertConfig(
        n_layers=2, dim=32, hidden_dim=64, n_heads=2, vocab_size=VOCAB, max_position_embeddings=2 * SEQ,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=NUM_CLASSES)
    return Case(_seeded(lambda: transformers.DistilBertForSequenceClassification(cfg)),
                (_tokens(BATCH, SEQ, seed=4),), class_loss,
                kwargs={"attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}, target=_classes())


def segformer() -> Case:
    import transformers

    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3],
        strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], decoder_hidden_size=32,
        num_labels=NUM_CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        classifier_dropout_prob=0.0, drop_path_rate=0.0)
    labels = torch.randint(0, NUM_CLASSES, (BATCH, IMAGE, IMAGE), generator=_gen(14))
    return Case(_seeded(lambda: transformers.SegformerForSemanticSegmentation(cfg)), (_images(),), hf_loss,
                kwargs={"labels": labels})


# -- plain PyTorch models ------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth as timm writes it: a per-sample Bernoulli mask from ``torch.rand``."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1, device=x.device) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class GroupNormBlock(nn.Module):
    def __init__(self, channels: int, drop_path: float) -> None:
        super().__init__()
        self.conv1, self.norm1 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels)
        self.conv2, self.norm2 = nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(4, channels)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class GroupNormCNN(nn.Module):
    def __init__(self, drop_path: float = 0.0) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(*[GroupNormBlock(16, drop_path) for _ in range(3)])
        self.head = nn.Linear(16, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class MixerLayer(nn.Module):
    def __init__(self, tokens: int, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = nn.Sequential(nn.Linear(tokens, 2 * tokens), nn.GELU(), nn.Linear(2 * tokens, tokens))
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.token_mlp(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.norm2(x))


class Mixer(nn.Module):
    def __init__(self, patch: int = 8, dim: int = 32) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.layers = nn.Sequential(*[MixerLayer((IMAGE // patch) ** 2, dim) for _ in range(3)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.layers(x)).mean(1))


class DictInput(nn.Module):
    """One dict argument in, a dict with a per-batch scalar out."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(4, 32)
        self.mid = nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32))
        self.out = nn.Linear(32, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        h = torch.relu(self.a(batch["x"])) * torch.sigmoid(self.b(batch["y"]))
        return {"logits": self.out(self.mid(h) + h), "aux": h.mean()}


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.Sequential(*[nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
                                      for _ in range(3)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.embed(tokens)))


def dict_loss(output: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output["logits"], target) + 0.1 * output["aux"]


def sum_count_loss(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed token loss, number of tokens that are not padding): the step loss is their ratio."""
    loss = F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
    return loss, (target != -100).sum()


def sum_count_mean(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The full-batch loss ``sum_count_loss`` stands for, for the reference."""
    return F.cross_entropy(output.flatten(0, 1), target.flatten(), ignore_index=-100)


def group_norm_cnn(drop_path: float = 0.0) -> Case:
    return Case(_seeded(lambda: GroupNormCNN(drop_path)), (_images(1, batch=8, size=16),), class_loss,
                target=_classes(2, batch=8), random=drop_path > 0, eval_plan=drop_path > 0)


def mixer() -> Case:
    return Case(_seeded(Mixer), (_images(3, batch=8),), class_loss, target=_classes(4, batch=8))


def dict_input() -> Case:
    batch = {"x": torch.randn(8, 8, generator=_gen(5)), "y": torch.randn(8, 4, generator=_gen(6))}
    return Case(_seeded(DictInput), (batch,), dict_loss, target=_classes(7, batch=8, classes=3))


def padded_lm_sum_count() -> Case:
    target = torch.randint(0, 50, (8, 6), generator=_gen(21))
    for row, padding in enumerate([0, 5, 1, 4, 2, 0, 3, 5]):  # uneven per sample and per micro-batch
        if padding:
            target[row, -padding:] = -100
    return Case(_seeded(TinyLM), (torch.randint(0, 50, (8, 6), generator=_gen(20)),), sum_count_loss,
                target=target)


CASES: dict[str, Callable[[], Case]] = {
    "gpt_neox": gpt_neox,
    "phi": phi,
    "phi3": phi3,
    "gemma": gemma,
    "opt_labels": opt_labels,
    "bart_decoder_inputs": bart_decoder_inputs,
    "roberta_labels": roberta_labels,
    "whisper": whisper,
    "convnext": convnext,
    "swin": swin,
    "deit": deit,
    "clip_vision": clip_vision,
    "clip_text": clip_text,
    "distilbert": distilbert,
    "segformer": segformer,
    "groupnorm_cnn": group_norm_cnn,
    "groupnorm_cnn_droppath": lambda: group_norm_cnn(drop_path=0.3),
    "mlp_mixer": mixer,
    "dict_input": dict_input,
    "padded_lm_sum_count": padded_lm_sum_count,
}


# -- references ------------------------------------------------------------------------
def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _microbatches(value: Any, num: int) -> list[Any]:
    leaves, spec = pytree.tree_flatten(value)
    parts = [leaf.chunk(num) if isinstance(leaf, torch.Tensor) and leaf.dim() else [leaf] * num
             for leaf in leaves]
    return [pytree.tree_unflatten([p[m] for p in parts], spec) for m in range(num)]


def _mean_loss(case: Case, output: Any, target: Any) -> torch.Tensor:
    fn = sum_count_mean if case.loss_fn is sum_count_loss else case.loss_fn
    return fn(output) if target is None else fn(output, target)


def reference(case: Case, pristine: nn.Module, plan: pipec.Plan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step loss and gradients (by ``named_parameters`` name) the pipeline should give."""
    if case.random:
        ref = pipec.reference_step(plan, *case.inputs, target=case.target, loss_fn=case.loss_fn, seed=SEED,
                                   **case.kwargs)
        return ref.loss.detach(), ref.grads
    model = copy.deepcopy(pristine).train()
    if _has_batch_norm(model):
        num = plan.num_microbatches
        total = torch.zeros(())
        for args, kwargs, target in zip(*(_microbatches(v, num) for v in (case.inputs, case.kwargs, case.target))):
            loss = _mean_loss(case, model(*args, **kwargs), target) / num
            loss.backward()
            total += loss.detach()
    else:
        total = _mean_loss(case, model(*case.inputs, **case.kwargs), case.target)
        total.backward()
    return total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _diff(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - want| / max(max |want|, floor)."""
    if not want.numel():
        return 0.0
    scale = max(float(want.detach().abs().max()), floor, 1e-12)
    return float((got.detach().double() - want.detach().double()).abs().max()) / scale


# -- checks ------------------------------------------------------------------------------
@dataclass
class Check:
    ok: bool
    detail: str = ""
    rel_diff: float | None = None


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _canonical(pristine: nn.Module) -> dict[str, str]:
    """Every name of a parameter (tied aliases too) -> its ``named_parameters`` name."""
    first: dict[int, str] = {}
    return {n: first.setdefault(id(p), n) for n, p in pristine.named_parameters(remove_duplicate=False)}


def _one_rank_runtime(plan: pipec.Plan, case: Case) -> pipec.PipelineRuntime:
    return pipec.PipelineRuntime(one_rank(plan), case.loss_fn, seed=SEED)


def grads_check(case: Case, plan: pipec.Plan, want_loss: torch.Tensor, want: dict[str, torch.Tensor],
                names: dict[str, str]) -> Check:
    try:
        pipe = _one_rank_runtime(plan, case).train()
        loss = pipe.step(*case.inputs, target=case.target, **case.kwargs)
        got = {names.get(n, n): p.grad for n, p in pipe.named_parameters() if p.grad is not None}
        pipe.close()
    except Exception as e:
        return Check(False, _error(e))
    if loss is None:
        return Check(False, "the step returned no loss on the rank holding the last stage")
    problems = []
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        problems.append(f"gradient names differ: missing {missing[:3]}, unexpected {extra[:3]}")
    floor = 1e-3 * max((float(w.abs().max()) for w in want.values() if w.numel()), default=0.0)
    worst, where = 0.0, ""
    for n in sorted(set(got) & set(want)):
        if got[n].shape != want[n].shape:
            problems.append(f"{n}: shape {tuple(got[n].shape)}, expected {tuple(want[n].shape)}")
            continue
        d = _diff(got[n], want[n], floor)
        if d > worst:
            worst, where = d, n
    loss_diff = _diff(loss, want_loss)
    if worst > TOL:
        problems.insert(0, f"gradients differ: max relative diff {worst:.2e} on {where}")
    if loss_diff > TOL:
        problems.insert(0, f"loss {float(loss):.6g}, reference {float(want_loss):.6g}")
    return Check(not problems, "; ".join(problems) or (f"largest difference on {where}" if where else ""), worst)


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Tensor leaves; a list of 0-d tensors (the runtime merges a scalar output, such as an
    HF ``loss``, into one per micro-batch) becomes their mean: equal micro-batches' means."""
    def per_microbatch(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(isinstance(t, torch.Tensor) and t.dim() == 0 for t in x)

    leaves = pytree.tree_leaves(value, is_leaf=per_microbatch)
    return [torch.stack(x).mean() if per_microbatch(x) else x
            for x in leaves if isinstance(x, torch.Tensor) or per_microbatch(x)]


def eval_check(case: Case, plan: pipec.Plan, pristine: nn.Module) -> Check:
    try:
        pipe = _one_rank_runtime(plan, case).eval()
        got = _tensor_leaves(pipe.forward(*case.inputs, **case.kwargs))
        pipe.close()
    except Exception as e:
        return Check(False, _error(e))
    with torch.no_grad():
        want = _tensor_leaves(copy.deepcopy(pristine).eval()(*case.inputs, **case.kwargs))
    if len(got) != len(want):
        return Check(False, f"the output has {len(got)} tensors, model.eval() gives {len(want)}")
    worst, problems = 0.0, []
    for i, (g, w) in enumerate(zip(got, want)):
        if g.shape != w.shape:
            problems.append(f"output {i}: shape {tuple(g.shape)}, expected {tuple(w.shape)}")
            continue
        d = _diff(g, w)
        worst = max(worst, d)
        if d > TOL:
            problems.append(f"output {i} {tuple(w.shape)}: max relative diff {d:.2e}")
    return Check(not problems, "; ".join(problems), worst)


@dataclass
class Result:
    name: str
    trace: set[str] = field(default_factory=set)
    checks: dict[str, dict[str, Check]] = field(default_factory=dict)  # schedule -> check -> result
    warnings: list[str] = field(default_factory=list)


def run_model(name: str, workdir: Path) -> Result:
    """Every schedule's checks of one model; the warnings pipec gives, once each, in ``result.warnings``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _run_model(name, workdir)
    for w in caught:
        line = str(w.message).splitlines()[0]
        if line not in result.warnings:
            result.warnings.append(line)
    return result


def _run_model(name: str, workdir: Path) -> Result:
    result = Result(name)
    case = CASES[name]()
    pristine = case.build().train()
    names = _canonical(pristine)
    for label, options in SCHEDULES.items():
        checks = result.checks[label] = {}
        model = copy.deepcopy(pristine)
        try:
            plan = pipec.partition(model, case.inputs, example_kwargs=case.kwargs or None, loss_fn=case.loss_fn,
                                   target=case.target, **options)
        except Exception as e:
            checks["partition"] = Check(False, _error(e))
            continue
        checks["partition"] = Check(True)
        result.trace.add(plan.data.trace_method)
        try:
            loaded: pipec.Plan | None = pipec.load(plan.save(workdir / f"{name}-{label}"))
            checks["save_load"] = Check(True)
        except Exception as e:
            loaded = None
            checks["save_load"] = Check(False, _error(e))
        # eval first: a training step would move BatchNorm running statistics of the plan's stages
        try:
            eval_plan = plan if not case.eval_plan else pipec.partition(
                copy.deepcopy(pristine).eval(), case.inputs, example_kwargs=case.kwargs or None,
                loss_fn=case.loss_fn, target=case.target, **options)
            checks["eval"] = eval_check(case, eval_plan, pristine)
        except Exception as e:
            checks["eval"] = Check(False, f"partition of model.eval(): {_error(e)}")
        try:
            want_loss, want = reference(case, pristine, plan)
        except Exception as e:
            checks["grads"] = checks["grads_loaded"] = Check(False, f"reference: {_error(e)}")
            continue
        checks["grads"] = grads_check(case, plan, want_loss, want, names)
        checks["grads_loaded"] = (grads_check(case, loaded, want_loss, want, names) if loaded is not None
                                  else Check(False, "not run: save_load failed"))
    return result


# -- output ------------------------------------------------------------------------------
def _cell(checks: dict[str, Check]) -> str:
    failed = [c for c in CHECKS if c in checks and not checks[c].ok]
    diffs = [d for c in ("grads", "grads_loaded") if c in checks and (d := checks[c].rel_diff) is not None]
    text = "ok" if not failed else "FAIL " + ",".join(failed)
    return text if not diffs else f"{text} ({max(diffs):.1e})"


def table(results: list[Result]) -> str:
    rows = [("model", "trace", *SCHEDULES)]
    for r in results:
        rows.append((r.name, ",".join(sorted(r.trace)) or "-", *(_cell(r.checks[s]) for s in SCHEDULES)))
    return aligned(rows)


def failures(results: list[Result]) -> str:
    out = []
    for r in results:
        for label, checks in r.checks.items():
            for name in CHECKS:
                if name in checks and not checks[name].ok:
                    out.append(f"{r.name} {label} {name}: {checks[name].detail.splitlines()[0]}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help="default: every model (see --list)")
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    args = parser.parse_args()
    if args.list:
        print("\n".join(CASES))
        return
    unknown = sorted(set(args.models) - set(CASES))
    if unknown:
        parser.error(f"unknown models {unknown}; known: {', '.join(CASES)}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models or list(CASES):
            results.append(run_model(name, Path(tmp)))
            print(f"{name}: {time.perf_counter() - started:.1f}s", file=sys.stderr, flush=True)
    print("cells: ok, or the failing checks; in brackets the max relative gradient difference\n")
    print(table(results))
    passed = sum(c.ok for r in results for checks in r.checks.values() for c in checks.values())
    total = len(results) * len(SCHEDULES) * len(CHECKS)
    print(f"\n{passed}/{total} checks pass on {len(results)} models in {time.perf_counter() - started:.1f}s")
    text = failures(results)
    if text:
        print("\nfailures (first line):\n" + text)
    said = "\n".join(f"{r.name}: {w}" for r in results for w in r.warnings)
    if said:
        print("\nwarnings (first line, once per model):\n" + said)


if __name__ == "__main__":
    main()
