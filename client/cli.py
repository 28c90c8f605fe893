"""The featurebank command: serve, extract, backbones, train-head, put-head, predict, heads."""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys

DEFAULT_TARGET = os.environ.get("FEATUREBANK_TARGET", "localhost:50051")


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from featurebank.server import app, config
    except ImportError as e:
        print(f"featurebank serve needs the server extra: pip install 'featurebank[server]' ({e})", file=sys.stderr)
        return 2
    try:
        cfg = config.from_args(args)
    except ValueError as e:
        print(f"featurebank serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("FEATUREBANK_LOG_LEVEL", cfg.log_level.upper())
    import asyncio

    asyncio.run(app.serve(cfg))
    return 0


def _read_inputs(paths: list[str], text_lines: bool) -> list:
    """Image files as Paths; with --text, every non-empty line of each file is one text."""
    if not text_lines:
        return [pathlib.Path(p) for p in paths]
    texts: list[str] = []
    for p in paths:
        texts.extend(line for line in pathlib.Path(p).read_text(encoding="utf-8").splitlines() if line.strip())
    return texts


def _cmd_extract(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from featurebank.client import FeatureBank, FeatureBankError
    from featurebank.v1 import featurebank_pb2 as pb

    inputs = _read_inputs(args.paths, args.text)
    if not inputs:
        print("featurebank extract: no inputs", file=sys.stderr)
        return 2
    rows, hits, failed = [], 0, 0
    with FeatureBank(args.target) as bank, tqdm(total=len(inputs), unit="item", disable=args.quiet) as bar:
        for start in range(0, len(inputs), args.batch_size):
            chunk = inputs[start:start + args.batch_size]
            try:
                outcomes = bank.extract_items(chunk, backbone=args.backbone, layer=args.layer,
                                              output_dtype=pb.FLOAT16 if args.float16 else pb.FLOAT32)
            except FeatureBankError as e:
                print(f"featurebank extract: {e}", file=sys.stderr)
                return 1
            for o in outcomes:
                if o.error is not None:
                    failed += 1
                    print(f"{inputs[start + o.index] if not args.text else f'line {start + o.index}'}: {o.error}", file=sys.stderr)
                    continue
                hits += o.cache_hit
                rows.append(o.features)
            bar.update(len(chunk))
            bar.set_postfix(hit_ratio=f"{hits / max(1, len(rows)):.2f}")
    if failed:
        print(f"featurebank extract: {failed} of {len(inputs)} inputs failed; nothing written", file=sys.stderr)
        return 1
    features = np.stack(rows)
    np.save(args.out, features)
    print(f"wrote {args.out}: {features.shape[0]} x {features.shape[1:]} {features.dtype}; "
          f"{hits} cache hits, {len(rows) - hits} computed")
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    try:
        with FeatureBank(args.target) as bank:
            infos = bank.backbones()
    except FeatureBankError as e:
        print(f"featurebank backbones: {e}", file=sys.stderr)
        return 1
    for b in infos:
        size = "x".join(str(d) for d in b.input_size)
        print(f"{b.name}  [{b.input_kind} {size}]  fingerprint {b.fingerprint[:16]}  workers ready {b.workers_ready}")
        print(f"    preprocessing: {b.preprocessing}")
        for layer in b.layers:
            default = "  (default)" if layer.name == b.default_layer else ""
            print(f"    layer {layer.name}: {tuple(layer.shape)}{default}")
    return 0


def _cmd_train_head(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError
    from featurebank.client.heads import Head

    try:
        with FeatureBank(args.target) as bank:
            fs = bank.features(args.data, backbone=args.backbone, layer=args.layer, text_column=args.text_column,
                               label_column=args.label_column, progress=not args.quiet)
            print(f"features: {len(fs)} x {fs.features.shape[1:]} from {fs.backbone}/{fs.layer}, "
                  f"{fs.hits} cache hits ({fs.hit_ratio:.0%}), classes {fs.class_names}")
            head = Head.train(fs, head=args.head, validation_split=args.validation_split, epochs=args.epochs,
                              verbose=0 if args.quiet else 2)
            head.save(args.out)
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(head.metrics.items()))
            print(f"wrote {args.out}: {head.kind} head, {metrics}")
            if args.put:
                info = bank.put_head(head, args.put)
                print(f"serving as {info.name} v{info.version}")
    except (FeatureBankError, ValueError, ImportError) as e:
        print(f"featurebank train-head: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_put_head(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    try:
        with FeatureBank(args.target) as bank:
            info = bank.put_head(args.path, args.name, args.version)
    except (FeatureBankError, ValueError, ImportError) as e:
        print(f"featurebank put-head: {e}", file=sys.stderr)
        return 1
    print(f"serving {info.name} v{info.version}: {info.kind} on {info.backbone}/{info.layer}, classes {list(info.class_names)}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    inputs = _read_inputs(args.paths, args.text)
    names = args.paths if not args.text else [f"line {i}" for i in range(len(inputs))]
    failed = 0
    try:
        with FeatureBank(args.target) as bank:
            predictions = bank.predict(args.head, inputs, version=args.version)
    except FeatureBankError as e:
        print(f"featurebank predict: {e}", file=sys.stderr)
        return 1
    import numpy as np

    for name, p in zip(names, predictions):
        if p.HasField("error"):
            failed += 1
            print(f"{name}\terror: {p.error.message}")
            continue
        prob = float(np.frombuffer(p.probabilities.data, np.float32)[p.label_index])
        print(f"{name}\t{p.label}\t{prob:.4f}")
    return 1 if failed else 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    try:
        with FeatureBank(args.target) as bank:
            heads = bank.list_heads(args.name)
    except FeatureBankError as e:
        print(f"featurebank heads: {e}", file=sys.stderr)
        return 1
    for h in heads:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(h.metrics.items()))
        print(f"{h.name} v{h.version}  {h.kind} on {h.backbone}/{h.layer} ({h.input_dim}-d)  classes {list(h.class_names)}  {metrics}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurebank", description="Shared feature-extraction backend.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (needs featurebank[server])")
    try:
        from featurebank.server import config

        config.add_arguments(serve)
    except ImportError:
        pass
    serve.set_defaults(func=_cmd_serve)

    extract = sub.add_parser("extract", help="features of image files (or text lines with --text) to a .npy file")
    extract.add_argument("paths", nargs="+", help="image files, or text files with --text (one text a line)")
    extract.add_argument("--out", required=True, help="where to write the (N, D) features (.npy)")
    extract.add_argument("--backbone", default="", help="backbone name (default: the server's for the input kind)")
    extract.add_argument("--layer", default="", help="layer name (default: the backbone's)")
    extract.add_argument("--text", action="store_true", help="inputs are text files, one text a line")
    extract.add_argument("--float16", action="store_true", help="ask for float16 features")
    extract.add_argument("--batch-size", type=int, default=64, help="inputs per request")
    extract.add_argument("--target", default=DEFAULT_TARGET, help="server address [env FEATUREBANK_TARGET]")
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(func=_cmd_extract)

    backbones = sub.add_parser("backbones", help="list the served backbones and layers")
    backbones.add_argument("--target", default=DEFAULT_TARGET, help="server address [env FEATUREBANK_TARGET]")
    backbones.set_defaults(func=_cmd_backbones)
    train = sub.add_parser("train-head", help="train a head on features from the store (needs featurebank[train])")
    train.add_argument("data", help="a folder of images in class sub-folders, or a CSV (with --text-column, --label-column)")
    train.add_argument("--out", required=True, help="where to write the head (.keras)")
    train.add_argument("--backbone", default="", help="backbone name (default: the server's for the input kind)")
    train.add_argument("--layer", default="", help="layer name (default: the backbone's)")
    train.add_argument("--head", choices=("logistic", "mlp"), default="logistic")
    train.add_argument("--validation-split", type=float, default=0.2)
    train.add_argument("--epochs", type=int, default=200, help="most epochs (early stopping on validation loss)")
    train.add_argument("--text-column", help="CSV column holding the text")
    train.add_argument("--label-column", help="CSV column holding the label")
    train.add_argument("--put", metavar="NAME", help="also upload the head to the server under this name")
    train.add_argument("--target", default=DEFAULT_TARGET, help="server address [env FEATUREBANK_TARGET]")
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=_cmd_train_head)

    put = sub.add_parser("put-head", help="upload a trained head (.keras) to the server")
    put.add_argument("path")
    put.add_argument("--name", required=True)
    put.add_argument("--version", type=int, default=0, help="0: the next version")
    put.add_argument("--target", default=DEFAULT_TARGET, help="server address [env FEATUREBANK_TARGET]")
    put.set_defaults(func=_cmd_put_head)

    predict = sub.add_parser("predict", help="labels from a served head for image files (or text lines with --text)")
    predict.add_argument("paths", nargs="+")
    predict.add_argument("--head", required=True, help="the head's name")
    predict.add_argument("--version", type=int, default=0, help="0: the latest")
    predict.add_argument("--text", action="store_true", help="inputs are text files, one text a line")
    predict.add_argument("--target", default=DEFAULT_TARGET, help="server address [env FEATUREBANK_TARGET]")
    predict.set_defaults(func=_cmd_predict)

    heads = sub.add_parser("heads", help="list the served heads")
    heads.add_argument("name", nargs="?", default="")
    heads.add_argument("--target", default=DEFAULT_TARGET, help="server address [env FEATUREBANK_TARGET]")
    heads.set_defaults(func=_cmd_heads)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
