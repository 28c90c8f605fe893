"""The featurebank command: serve, extract, backbones, train-head, put-head, predict, heads.

Every mistake a user can make here ends in one line on stderr that names the file, port or flag
that fixes it: exit 2 for usage errors (bad flags, missing or wrong files), 1 for everything else.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pathlib
import sys
import tempfile

DEFAULT_TARGET = os.environ.get("FEATUREBANK_TARGET", "localhost:50051")
# File names that hold text, for the hint when one is sent as an image.
_TEXT_SUFFIXES = frozenset({".txt", ".csv", ".tsv", ".json", ".jsonl", ".md"})
_SHOWN_ITEM_ERRORS = 10
EPILOG = """exit status: 0 done, 1 failed (server unreachable, port in use, items failed), 2 usage error.
Every serve flag is also an env var (FEATUREBANK_PORT, ...); --target defaults to env FEATUREBANK_TARGET."""


class UsageError(Exception):
    """A mistake in the command line or its files: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("featurebank")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


@contextlib.contextmanager
def _quiet_native_stderr():
    """Hold fd 2 while TensorFlow loads: its C++ libraries (CUDA stubs, absl) write there directly,
    before any log level applies. What they wrote is replayed if loading fails."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # the cuInit error line on a CPU machine, later
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _load_tensorflow() -> None:
    """Import TensorFlow and Keras quietly (client commands never ask for GPUs)."""
    try:
        with _quiet_native_stderr():
            import keras  # noqa: F401
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe happens here, still held
    except ImportError as e:
        raise UsageError(f"this command needs TensorFlow: pip install -e '.[train]' ({e})") from None


def _rpc_error(e, target: str) -> str:
    """One line for a failed RPC; an unreachable server says how to reach one."""
    import grpc

    if e.code == grpc.StatusCode.UNAVAILABLE and ("connect" in e.message.lower() or "backends" in e.message):
        reason = "connection refused" if "refused" in e.message.lower() else e.message.split(";")[0]
        return (
            f"no featurebank server at {target} ({reason}): start one with `featurebank serve`, "
            f"or point --target (env FEATUREBANK_TARGET) at it"
        )
    return str(e)


def _existing(p: str, what: str = "file") -> pathlib.Path:
    path = pathlib.Path(p)
    if not path.exists():
        raise UsageError(f"{p}: no such {what}")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{p}: permission denied")
    return path


def _read_inputs(paths: list[str], text_lines: bool) -> tuple[list, list[str]]:
    """(inputs, their names): image files as Paths (a folder expands to the images under it,
    sorted); with --text, every non-empty line of each file is one text, named file:line."""
    from featurebank.client.datasets import IMAGE_EXTENSIONS

    inputs: list = []
    names: list[str] = []
    for p in paths:
        path = _existing(p)
        if path.is_dir():
            if text_lines:
                raise UsageError(
                    f"{p} is a folder; --text reads text files, one text a line: pass the files "
                    f"(e.g. {p.rstrip('/')}/*.txt)"
                )
            files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise UsageError(
                    f"{p} is a folder with no {'/'.join(IMAGE_EXTENSIONS)} files under it; "
                    f"pass image files, or a folder that holds some"
                )
            inputs.extend(files)
            names.extend(str(f) for f in files)
        elif text_lines:
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(
                    f"{p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); --text reads "
                    f"text files, one text a line: drop --text to send images"
                ) from None
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    inputs.append(line)
                    names.append(f"{p}:{number}")
        else:
            inputs.append(path)
            names.append(p)
    if not inputs:
        raise UsageError("no inputs: every text file given is empty")
    return inputs, names


def _item_error_line(name: str, error) -> str:
    hint = ""
    if "decode image" in error.message and pathlib.Path(name).suffix.lower() in _TEXT_SUFFIXES:
        hint = " (a text file? add --text to send its lines as text)"
    return f"{name}: {error.code.name}: {' '.join(error.message.split())}{hint}"


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from featurebank.server import app, config
        from featurebank.server.ports import PortInUseError
    except ImportError as e:
        raise UsageError(f"featurebank serve needs the server extra: pip install -e '.[server]' ({e})") from None
    try:
        cfg = config.from_args(args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("FEATUREBANK_LOG_LEVEL", cfg.log_level.upper())
    import asyncio

    try:
        code = asyncio.run(app.serve(cfg))
    except PortInUseError as e:
        print(f"featurebank serve: {e}", file=sys.stderr)
        return 1
    return code or 0  # 1 when --frontends N gave up on an engine that kept dying


def _cmd_extract(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from featurebank.client import FeatureBank, FeatureBankError
    from featurebank.v1 import featurebank_pb2 as pb

    inputs, names = _read_inputs(args.paths, args.text)
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    rows, hits, failed = [], 0, []
    with FeatureBank(args.target) as bank, tqdm(total=len(inputs), unit="item", disable=args.quiet, leave=False) as bar:
        for start in range(0, len(inputs), args.batch_size):
            chunk = inputs[start : start + args.batch_size]
            try:
                outcomes = bank.extract_items(
                    chunk,
                    backbone=args.backbone,
                    layer=args.layer,
                    output_dtype=pb.FLOAT16 if args.float16 else pb.FLOAT32,
                )
            except FeatureBankError as e:
                bar.close()
                print(f"featurebank extract: {_rpc_error(e, args.target)}", file=sys.stderr)
                return 1
            for o in outcomes:
                if o.error is not None:
                    failed.append((start + o.index, o.error))
                    continue
                hits += o.cache_hit
                rows.append(o.features)
            bar.update(len(chunk))
            bar.set_postfix(hit_ratio=f"{hits / max(1, len(rows)):.2f}")
    report = args.report or (args.out[:-4] if args.out.endswith(".npy") else args.out) + ".errors.tsv"
    if failed and not args.skip_errors:
        for index, error in failed[:_SHOWN_ITEM_ERRORS]:
            print(_item_error_line(names[index], error), file=sys.stderr)
        if len(failed) > _SHOWN_ITEM_ERRORS:
            print(f"... and {len(failed) - _SHOWN_ITEM_ERRORS} more", file=sys.stderr)
        print(
            f"featurebank extract: {len(failed)} of {len(inputs)} inputs failed; nothing written "
            f"(--skip-errors writes the others to {args.out} and lists the failed ones in {report})",
            file=sys.stderr,
        )
        return 1
    if not rows:
        print(f"featurebank extract: all {len(inputs)} inputs failed; nothing written", file=sys.stderr)
        for index, error in failed[:_SHOWN_ITEM_ERRORS]:
            print(_item_error_line(names[index], error), file=sys.stderr)
        return 1
    features = np.stack(rows)
    np.save(args.out, features)
    if failed:
        with open(report, "w", encoding="utf-8") as f:
            f.write("index\tinput\tcode\tmessage\n")
            for index, error in failed:
                f.write(f"{index}\t{names[index]}\t{error.code.name}\t{' '.join(error.message.split())}\n")
        print(
            f"featurebank extract: {len(failed)} of {len(inputs)} inputs failed (left out of {args.out}, "
            f"listed in {report})",
            file=sys.stderr,
        )
    print(
        f"wrote {args.out}: {features.shape[0]} x {features.shape[1:]} {features.dtype}; "
        f"{hits} cache hits, {len(rows) - hits} computed"
    )
    return 0


def _cmd_backbones(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    try:
        with FeatureBank(args.target) as bank:
            infos = bank.backbones()
    except FeatureBankError as e:
        print(f"featurebank backbones: {_rpc_error(e, args.target)}", file=sys.stderr)
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
    import warnings

    from featurebank.client import FeatureBank, FeatureBankError

    _existing(args.data, "file or folder")
    if not args.out.endswith(".keras"):
        raise UsageError(f"--out {args.out}: heads are saved as .keras files")
    _load_tensorflow()
    from featurebank.client.heads import Head, SmallDataWarning

    try:
        with FeatureBank(args.target) as bank:
            fs = bank.features(
                args.data,
                backbone=args.backbone,
                layer=args.layer,
                text_column=args.text_column,
                label_column=args.label_column,
                progress=not args.quiet,
            )
            print(
                f"features: {len(fs)} x {fs.features.shape[1:]} from {fs.backbone}/{fs.layer}, "
                f"{fs.hits} cache hits ({fs.hit_ratio:.0%}), classes {fs.class_names}"
            )
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", SmallDataWarning)
                head = Head.train(
                    fs,
                    head=args.head,
                    validation_split=args.validation_split,
                    epochs=args.epochs,
                    verbose=0 if args.quiet else 2,
                )
            for w in caught:
                if issubclass(w.category, SmallDataWarning):
                    print(f"featurebank train-head: {w.message}", file=sys.stderr)
            head.save(args.out)
            which = "validation metrics" if head.validated else "training metrics (no validation)"
            metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(head.metrics.items()))
            print(f"wrote {args.out}: {head.kind} head; {which}: {metrics}")
            if args.put:
                info = bank.put_head(head, args.put)
                print(f"serving as {info.name} v{info.version}")
    except FeatureBankError as e:
        print(f"featurebank train-head: {_rpc_error(e, args.target)}", file=sys.stderr)
        return 1
    except ValueError as e:  # no labels, one class, no sub-folders: the data is the mistake
        raise UsageError(f"{args.data}: {e}") from None
    return 0


def _cmd_put_head(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    _existing(args.path)
    _load_tensorflow()
    try:
        with FeatureBank(args.target) as bank:
            info = bank.put_head(args.path, args.name, args.version)
    except FeatureBankError as e:
        print(f"featurebank put-head: {_rpc_error(e, args.target)}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:  # not a head file
        raise UsageError(f"{args.path}: {e}") from None
    print(
        f"serving {info.name} v{info.version}: {info.kind} on {info.backbone}/{info.layer}, classes {info.class_names}"
    )
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    inputs, names = _read_inputs(args.paths, args.text)
    try:
        with FeatureBank(args.target) as bank:
            predictions = bank.predict(args.head, inputs, version=args.version)
    except FeatureBankError as e:
        print(f"featurebank predict: {_rpc_error(e, args.target)}", file=sys.stderr)
        return 1
    failed = 0
    for name, p in zip(names, predictions):
        if p.error is not None:
            failed += 1
            print(_item_error_line(name, p.error), file=sys.stderr)
            continue
        print(f"{name}\t{p.label}\t{p.probability:.4f}")
    return 1 if failed else 0


def _cmd_heads(args: argparse.Namespace) -> int:
    from featurebank.client import FeatureBank, FeatureBankError

    try:
        with FeatureBank(args.target) as bank:
            heads = bank.list_heads(args.name)
    except FeatureBankError as e:
        print(f"featurebank heads: {_rpc_error(e, args.target)}", file=sys.stderr)
        return 1
    for h in heads:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in sorted(h.metrics.items()))
        print(
            f"{h.name} v{h.version}  {h.kind} on {h.backbone}/{h.layer} ({h.input_dim}-d)  classes {h.class_names}  {metrics}"
        )
    return 0


def _target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=DEFAULT_TARGET,
        help=f"server address host:port (default {DEFAULT_TARGET}; env FEATUREBANK_TARGET)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="featurebank", description="Shared feature-extraction backend.", epilog=EPILOG)
    parser.add_argument(
        "--version", action="version", version=f"featurebank {_version()}", help="print the version and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server (needs the server extra)", epilog=EPILOG)
    try:
        from featurebank.server import config

        config.add_arguments(serve)
    except ImportError:
        pass
    serve.set_defaults(func=_cmd_serve)

    extract = sub.add_parser(
        "extract", help="features of image files (or text lines with --text) to a .npy file", epilog=EPILOG
    )
    extract.add_argument(
        "paths",
        nargs="+",
        help="image files or folders of them (searched recursively, sorted); with --text, text files (one text a line)",
    )
    extract.add_argument("--out", required=True, help="where to write the (N, D) features (.npy), rows in input order")
    extract.add_argument("--backbone", default="", help="backbone name (default: the server's for the input kind)")
    extract.add_argument("--layer", default="", help="layer name (default: the backbone's)")
    extract.add_argument("--text", action="store_true", help="inputs are text files, one text a line")
    extract.add_argument("--float16", action="store_true", help="ask for float16 features")
    extract.add_argument("--batch-size", type=int, default=64, help="inputs per request (default 64)")
    extract.add_argument(
        "--skip-errors",
        action="store_true",
        help="write the features of the inputs that worked (rows in input order, failed ones left "
        "out) and list the failed ones in --report, instead of writing nothing",
    )
    extract.add_argument(
        "--report",
        help="with --skip-errors: where to list the failed inputs (TSV: index, input, "
        "code, message); default OUT with .errors.tsv for .npy",
    )
    _target(extract)
    extract.add_argument("--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(func=_cmd_extract)

    backbones = sub.add_parser("backbones", help="list the served backbones and layers", epilog=EPILOG)
    _target(backbones)
    backbones.set_defaults(func=_cmd_backbones)

    train = sub.add_parser(
        "train-head", help="train a head on features from the store (needs the train extra)", epilog=EPILOG
    )
    train.add_argument(
        "data",
        help="a folder of images in class sub-folders (photos/<class>/*.jpg), or a CSV "
        "(with --text-column, --label-column)",
    )
    train.add_argument("--out", required=True, help="where to write the head (.keras)")
    train.add_argument("--backbone", default="", help="backbone name (default: the server's for the input kind)")
    train.add_argument("--layer", default="", help="layer name (default: the backbone's)")
    train.add_argument(
        "--head",
        choices=("logistic", "mlp"),
        default="logistic",
        help="softmax regression, or one hidden ReLU layer (default logistic)",
    )
    train.add_argument(
        "--validation-split",
        type=float,
        default=0.2,
        help="fraction held out for early stopping and the reported metrics (default 0.2); with "
        "fewer than 20 a class, every label trains and the metrics are training metrics",
    )
    train.add_argument("--epochs", type=int, default=200, help="most epochs (early stopping on validation loss)")
    train.add_argument("--text-column", help="CSV column holding the text")
    train.add_argument("--label-column", help="CSV column holding the label")
    train.add_argument("--put", metavar="NAME", help="also upload the head to the server under this name")
    _target(train)
    train.add_argument("--quiet", action="store_true", help="no progress output")
    train.set_defaults(func=_cmd_train_head)

    put = sub.add_parser("put-head", help="upload a trained head (.keras) to the server", epilog=EPILOG)
    put.add_argument("path", help="a head saved by train-head or Head.save (.keras)")
    put.add_argument("--name", required=True, help="the name to serve it under")
    put.add_argument("--version", type=int, default=0, help="version number (default 0: the next one)")
    _target(put)
    put.set_defaults(func=_cmd_put_head)

    predict = sub.add_parser(
        "predict", help="labels from a served head for image files (or text lines with --text)", epilog=EPILOG
    )
    predict.add_argument("paths", nargs="+", help="image files or folders of them; with --text, text files")
    predict.add_argument("--head", required=True, help="the served head's name")
    predict.add_argument("--version", type=int, default=0, help="head version (default 0: the latest)")
    predict.add_argument("--text", action="store_true", help="inputs are text files, one text a line")
    _target(predict)
    predict.set_defaults(func=_cmd_predict)

    heads = sub.add_parser("heads", help="list the served heads", epilog=EPILOG)
    heads.add_argument("name", nargs="?", default="", help="only the versions of this head (default: every head)")
    _target(heads)
    heads.set_defaults(func=_cmd_heads)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"featurebank {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
