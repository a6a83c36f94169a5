"""Patient-level aggregators: patch parameters of one knee -> OA probability and severity.

- ``transformer``: each valid patch is a token (its standardised parameters, a learnt ROI embedding and
  an encoding of its position relative to the bone); a learnt classification token is read out by two
  heads, the OA logit and the severity score (the published method regresses MOAKS the same way).
- ``mlp``: a small two-head MLP on the 16 ROI means (4 ROIs × 4 parameters).
- Both neural aggregators are ensembles of ``members`` networks (default 3) that differ only in their seed; a
  prediction is the mean of the members' probabilities and severities (one network's AUC moves with its
  initialisation alone by up to ±0.03 on the demo cohort, and three members raised the mean AUC on every
  development cohort; see docs/diagnosis.md).
- ``logistic``: L2 logistic regression on the ROI means, with ridge regression for severity
  (scikit-learn for fitting; the coefficients are stored as tensors and applied with numpy).

Every aggregator fits its :class:`~.data.Normaliser` on the training knees it is given, so
cross-validation never sees test-fold statistics. Hyper-parameters are fixed here in advance
(:data:`DEFAULTS`), chosen on synthetic development cohorts (:mod:`.synthetic`, several cohort seeds) and
never tuned on phantom or patient evaluation data.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from .data import KneeSet, Normaliser, ROI_MEAN_FEATURES, ROI_ORDER

AGGREGATORS = ("transformer", "mlp", "logistic")
MEMBER_SEED_STEP = 1000  # seed offset between ensemble members (folds use seed + k, k < folds)

DEFAULTS = {
    "transformer": {"d_model": 32, "heads": 4, "layers": 1, "ff": 64, "dropout": 0.1, "steps": 200,
                    "batch": 16, "lr": 3e-3, "weight_decay": 0.05, "max_tokens": 24, "severity_weight": 0.5,
                    "members": 3},
    "mlp": {"hidden": 32, "dropout": 0.1, "epochs": 200, "lr": 3e-3, "weight_decay": 1e-2, "severity_weight": 0.5,
            "members": 3},
    "logistic": {"C": 1.0, "ridge_alpha": 1.0},
}


@contextlib.contextmanager
def _torch_threads(n: int = 1):
    """Small models run fastest single-threaded; restore the caller's setting afterwards."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _severity_target(knees: KneeSet, norm: Normaliser) -> tuple[np.ndarray, np.ndarray]:
    sev = knees.severity if knees.severity is not None else np.full(len(knees), np.nan)
    known = np.isfinite(sev)
    return np.where(known, (sev - norm.sev_mean) / norm.sev_std, 0.0).astype(np.float32), known


@dataclass
class Aggregator:
    """Base: ``fit(knees, seed)``, ``predict(knees) -> (probability, severity)``, state for model files."""

    kind: str
    config: dict = field(default_factory=dict)
    norm: Normaliser | None = None

    def __post_init__(self):
        self.config = {**DEFAULTS[self.kind], **self.config}

    def fit(self, knees: KneeSet, seed: int = 0) -> "Aggregator":
        raise NotImplementedError

    def predict(self, knees: KneeSet) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def tensors(self) -> dict:
        raise NotImplementedError

    def load_tensors(self, tensors: dict) -> "Aggregator":
        raise NotImplementedError


class LogisticAggregator(Aggregator):
    def fit(self, knees, seed=0):
        from sklearn.linear_model import LogisticRegression, Ridge

        self.norm = Normaliser.fit(knees)
        x = self.norm.roi_means(knees).astype(float)
        clf = LogisticRegression(C=self.config["C"], max_iter=2000).fit(x, knees.oa)
        self.w, self.b = clf.coef_[0].astype(float), float(clf.intercept_[0])
        t, known = _severity_target(knees, self.norm)
        if known.sum() >= 2:
            reg = Ridge(alpha=self.config["ridge_alpha"]).fit(x[known], t[known])
            self.v, self.c = reg.coef_.astype(float), float(reg.intercept_)
        else:
            self.v, self.c = np.zeros(x.shape[1]), 0.0
        return self

    def predict(self, knees):
        x = self.norm.roi_means(knees).astype(float)
        prob = 1.0 / (1.0 + np.exp(-(x @ self.w + self.b)))
        sev = (x @ self.v + self.c) * self.norm.sev_std + self.norm.sev_mean
        return prob, sev

    def tensors(self):
        return {**self.norm.to_tensors(), "logistic.coef": self.w, "logistic.intercept": np.array([self.b]),
                "ridge.coef": self.v, "ridge.intercept": np.array([self.c])}

    def load_tensors(self, t):
        self.norm = Normaliser.from_tensors(t)
        self.w = np.asarray(t["logistic.coef"], float)
        self.b = float(np.asarray(t["logistic.intercept"])[0])
        self.v = np.asarray(t["ridge.coef"], float)
        self.c = float(np.asarray(t["ridge.intercept"])[0])
        return self

    def coefficients(self) -> dict:
        """Logistic coefficients per standardised ROI-mean feature (for interpretation)."""
        return dict(zip(ROI_MEAN_FEATURES, self.w.tolist()))


def _build_net(kind: str, cfg: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class TwoHeads(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.oa = nn.Linear(d, 1)
            self.severity = nn.Linear(d, 1)

        def forward(self, h):
            return self.oa(h).squeeze(-1), self.severity(h).squeeze(-1)

    class MLPNet(nn.Module):
        def __init__(self):
            super().__init__()
            h = cfg["hidden"]
            self.body = nn.Sequential(nn.Linear(len(ROI_MEAN_FEATURES), h), nn.GELU(), nn.Dropout(cfg["dropout"]),
                                      nn.Linear(h, h), nn.GELU())
            self.heads = TwoHeads(h)

        def forward(self, x):
            return self.heads(self.body(x))

    class TransformerNet(nn.Module):
        def __init__(self):
            super().__init__()
            d = cfg["d_model"]
            self.param_proj = nn.Linear(4, d)
            self.pos_proj = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))
            self.roi_embed = nn.Embedding(len(ROI_ORDER), d)
            self.type_embed = nn.Embedding(2, d)          # 0: patch token, 1: ROI summary token
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            layer = nn.TransformerEncoderLayer(d, cfg["heads"], cfg["ff"], cfg["dropout"], batch_first=True,
                                               norm_first=True, activation="gelu")
            self.encoder = nn.TransformerEncoder(layer, cfg["layers"], enable_nested_tensor=False)
            # read out: the classification token and the mean token output of each ROI
            self.norm = nn.LayerNorm((1 + len(ROI_ORDER)) * d)
            self.heads = TwoHeads((1 + len(ROI_ORDER)) * d)

        def forward(self, x, roi, pad):
            tok = (self.param_proj(x[..., :4]) + self.pos_proj(x[..., 4:7]) + self.roi_embed(roi)
                   + self.type_embed(x[..., 7].long()))
            tok = torch.cat([self.cls.expand(tok.shape[0], -1, -1), tok], dim=1)
            pad = torch.cat([torch.zeros(pad.shape[0], 1, dtype=torch.bool), pad], dim=1)
            h = self.encoder(tok, src_key_padding_mask=pad)
            # per-ROI mean of the token outputs (zero for a ROI without patches), in ROI order
            member = F.one_hot(roi, len(ROI_ORDER)).float() * (~pad[:, 1:]).unsqueeze(-1).float()
            pooled = torch.einsum("btr,btd->brd", member, h[:, 1:]) / member.sum(1).clamp(min=1.0).unsqueeze(-1)
            return self.heads(self.norm(torch.cat([h[:, 0], pooled.flatten(1)], dim=-1)))

    return TransformerNet() if kind == "transformer" else MLPNet()


def _pad_tokens(tokens, rois, idx, max_tokens, rng):
    """Pad the knees ``idx`` to one batch; with ``rng``, draw at most ``max_tokens`` patch tokens per knee
    (ROI summary tokens are always kept)."""
    import torch

    chosen = []
    for i in idx:
        patch = np.flatnonzero(tokens[i][:, 7] == 0)
        if rng is not None and patch.size > max_tokens:
            patch = np.sort(rng.choice(patch, max_tokens, replace=False))
        chosen.append(np.r_[patch, np.flatnonzero(tokens[i][:, 7] == 1)])
    t = max(len(s) for s in chosen)
    x = np.zeros((len(idx), t, tokens[idx[0]].shape[1]), np.float32)
    r = np.zeros((len(idx), t), np.int64)
    pad = np.ones((len(idx), t), bool)
    for b, (i, sel) in enumerate(zip(idx, chosen)):
        x[b, :len(sel)] = tokens[i][sel]
        r[b, :len(sel)] = rois[i][sel]
        pad[b, :len(sel)] = False
    return torch.from_numpy(x), torch.from_numpy(r), torch.from_numpy(pad)


class TorchAggregator(Aggregator):
    """MLP or Transformer, trained with BCE on OA plus weighted MSE on standardised severity."""

    def _inputs(self, knees):
        if self.kind == "mlp":
            return self.norm.roi_means(knees), None
        return self.norm.tokens(knees), [np.r_[r, np.unique(r)] for r in knees.roi_index]

    def _forward(self, net, inputs, idx, rng=None):
        import torch

        feats, rois = inputs
        if self.kind == "mlp":
            return net(torch.from_numpy(feats[idx]))
        return net(*_pad_tokens(feats, rois, idx, self.config["max_tokens"], rng))

    def fit(self, knees, seed=0):
        """Train ``members`` networks that differ only in their seed (``seed + MEMBER_SEED_STEP * i``; member 0
        is the single network of ``members: 1``); :meth:`predict` averages their outputs."""
        self.norm = Normaliser.fit(knees)
        inputs = self._inputs(knees)
        self.nets = [self._fit_one(knees, inputs, seed + MEMBER_SEED_STEP * i) for i in range(self.config["members"])]
        return self

    def _fit_one(self, knees, inputs, seed):
        import torch
        import torch.nn.functional as F

        cfg = self.config
        y = torch.from_numpy(knees.oa.astype(np.float32))
        sev, known = _severity_target(knees, self.norm)
        sev, known = torch.from_numpy(sev), torch.from_numpy(known)
        rng = np.random.default_rng(seed)
        with _torch_threads(1):
            torch.manual_seed(seed)
            net = _build_net(self.kind, cfg)
            opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
            n = len(knees)
            batch = cfg.get("batch", n)
            # the transformer's training length is a number of optimisation steps, so that small cohorts
            # (few batches per epoch) still train to convergence
            epochs = cfg["epochs"] if "epochs" in cfg else max(1, -(-cfg["steps"] // -(-n // batch)))
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
            net.train()
            for _ in range(epochs):
                order = rng.permutation(n)
                for s in range(0, n, batch):
                    idx = order[s:s + batch]
                    logit, sev_hat = self._forward(net, inputs, idx, rng)
                    loss = F.binary_cross_entropy_with_logits(logit, y[idx])
                    k = known[idx]
                    if k.any():
                        loss = loss + cfg["severity_weight"] * F.mse_loss(sev_hat[k], sev[idx][k])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                sched.step()
        net.eval()
        return net

    def predict(self, knees):
        """OA probability and severity: the mean over the ensemble's members."""
        import torch

        inputs = self._inputs(knees)
        probs, sevs = [], []
        with _torch_threads(1), torch.no_grad():
            for net in self.nets:
                net.eval()
                for s in range(0, len(knees), 32):
                    idx = np.arange(s, min(s + 32, len(knees)))
                    logit, sev_hat = self._forward(net, inputs, idx)
                    probs.append(torch.sigmoid(logit).numpy())
                    sevs.append(sev_hat.numpy())
        m = len(self.nets)
        prob = np.concatenate(probs).astype(float).reshape(m, len(knees)).mean(0)
        sev = np.concatenate(sevs).astype(float).reshape(m, len(knees)).mean(0)
        return prob, sev * self.norm.sev_std + self.norm.sev_mean

    def tensors(self):
        return {**self.norm.to_tensors(),
                **{f"net.{i}.{k}": v for i, net in enumerate(self.nets) for k, v in net.state_dict().items()}}

    def load_tensors(self, t):
        """Members are stored as ``net.<i>.<parameter>``; a file written before ensembles (``net.<parameter>``,
        one network) loads as a single member."""
        self.norm = Normaliser.from_tensors(t)
        per_member: dict[int, dict] = {}
        for k, v in t.items():
            if not k.startswith("net."):
                continue
            head, _, rest = k[4:].partition(".")
            i, name = (int(head), rest) if head.isdigit() else (0, k[4:])
            per_member.setdefault(i, {})[name] = v
        if sorted(per_member) != list(range(len(per_member))) or not per_member:
            raise KeyError("network members are missing")
        self.config["members"] = len(per_member)
        self.nets = []
        for i in range(len(per_member)):
            net = _build_net(self.kind, self.config)
            net.load_state_dict(per_member[i])
            net.eval()
            self.nets.append(net)
        return self


def make_aggregator(kind: str, config: dict | None = None) -> Aggregator:
    """A fresh, untrained aggregator of ``kind`` (transformer, mlp or logistic)."""
    from ..errors import UserError

    if kind not in AGGREGATORS:
        raise UserError(f"unknown aggregator {kind!r}; choose one of {', '.join(AGGREGATORS)}")
    unknown = set(config or {}) - set(DEFAULTS[kind])
    if unknown:
        raise UserError(f"unknown {kind} setting(s): {', '.join(sorted(unknown))}")
    members = (config or {}).get("members", 1)
    if isinstance(members, bool) or not isinstance(members, (int, np.integer)) or members < 1:
        raise UserError(f"{kind} setting 'members' must be a whole number of networks, at least 1 (got {members!r})")
    cls = LogisticAggregator if kind == "logistic" else TorchAggregator
    return cls(kind, dict(config or {}))
