"""Command line: ``image-search index|search|serve`` and the original tool's flags.

    image-search index  --config C [--no-cleanup]
    image-search search --config C [--no-cleanup] [FILE...] [--text WORDS]... [--query DOC.json]...
                 [--unlike WORDS]... [--folder F]... [--after D] [--before D] [--camera C] [--format F]...
                 [--top-k N] [--min-similarity X]
    image-search duplicates --config C [--no-cleanup] [--folder F] [--kind copy,near-copy,similar]
    image-search serve  --config C [--no-cleanup] [--poll]
    image-search --env C [--process-only | --search FILE] [--no-cleanup]   (the original interface;
                 with neither flag: an interactive prompt that keeps the model loaded)
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

import psycopg2
import structlog

from .config import Config, load_config
from .errors import DatabaseFailure, ExitCode, ImageSearchError, NoTextTower, UnusableFile, describe
from .indexer import IndexSummary, Indexer
from .logs import configure_logging
from .names import escape, unescape
from .query import DUPLICATE_KINDS, FILTER_FORMATS, MAX_TOP_K, QuerySpec
from .querydoc import QueryFlagError, duplicates_from_flags, is_query_document, spec_from_flags
from .runtime import Runtime, ShutdownRequested, install_stop_handlers, open_runtime
from .output import TextQuery
from .search import search_file, search_query
from .wording import counted

log = structlog.get_logger("image_search")


def _common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The flags taken before the command and after it alike. A command's own leaves unset what it was not
    given: its default overwrote the same flag given before the command (``image-search --no-cleanup
    serve`` emptied the table at its stop)."""
    unset = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("--config", "--env", dest="config", type=Path, metavar="PATH",
                        help="JSON config file (--env is the original tool's name for it)", **unset)
    parser.add_argument("--no-cleanup", action="store_true",
                        help="keep the table's rows at exit (default: emptied, unless cleanup-on-exit is false)", **unset)
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        **({"default": "info"} if top else unset))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="image-search", description="Image similarity search with a CLIP-family "
                                     "model and PostgreSQL + pgvector.")
    _common(parser, top=True)
    legacy = parser.add_mutually_exclusive_group()
    legacy.add_argument("--process-only", action="store_true", help="index the source folder, then exit")
    legacy.add_argument("--search", type=Path, metavar="FILE", help="index incrementally, search with FILE, exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    index = commands.add_parser("index", help="index the source folder once")
    _common(index, top=False)
    search = commands.add_parser("search", help="index incrementally, then search with each FILE (a picture, or "
                                 "a .txt file of words), each --text and each --query")
    _common(search, top=False)
    search.add_argument("files", nargs="*", type=Path, metavar="FILE")
    search.add_argument("--text", action="append", default=[], metavar="WORDS",
                        help="search for pictures matching these words (repeatable: one result folder each)")
    search.add_argument("--query", action="append", default=[], type=Path, metavar="PATH",
                        help="search with a query document (JSON: words, pictures, weights, filters; see the README) "
                             "(repeatable: one result folder each)")
    _query_flags(search.add_argument_group("query", "what each FILE and --text search looks like and looks for"))
    duplicates = commands.add_parser("duplicates", help="index incrementally, then write a report of copies, "
                                     "near-copies and similar pictures (nothing is deleted); print its folder")
    _common(duplicates, top=False)
    duplicates.add_argument("--folder", action="append", default=[], metavar="FOLDER",
                            help="only this folder of source-directory and below it (repeatable: any of them)")
    duplicates.add_argument("--kind", action="append", default=[], metavar="KINDS",
                            help=f"the kinds of group, a comma list of {', '.join(DUPLICATE_KINDS)} (repeatable; "
                                 "default: all)")
    serve = commands.add_parser("serve", help="run the service: watch the source folder and the inbox")
    _common(serve, top=False)
    serve.add_argument("--poll", action="store_true",
                       help="poll the folders instead of inotify (for NFS/SMB mounts)")
    return parser


def _query_flags(group: argparse._ArgumentGroup) -> None:
    """The flags a query document's keys have on the command line (querydoc.spec_from_flags checks them)."""
    group.add_argument("--unlike", action="append", default=[], metavar="WORDS",
                       help="push away pictures matching these words (repeatable)")
    group.add_argument("--folder", action="append", default=[], metavar="FOLDER",
                       help="only pictures in this folder of source-directory or below it (repeatable: any of them)")
    group.add_argument("--after", metavar="DATE", help="only pictures taken at or after this ISO 8601 date or "
                       "date-time (without an offset: this machine's local time)")
    group.add_argument("--before", metavar="DATE", help="only pictures taken before this date or date-time")
    group.add_argument("--camera", metavar="TEXT", help="only pictures whose camera make and model contain this "
                       "(any case)")
    group.add_argument("--format", dest="formats", action="append", default=[], metavar="FORMAT",
                       help=f"only pictures in this format: {', '.join(FILTER_FORMATS)} (repeatable, or a comma list)")
    group.add_argument("--top-k", metavar="N", help=f"how many hits (1 to {MAX_TOP_K}; default: the config's top-k)")
    group.add_argument("--min-similarity", metavar="X",
                       help="only hits at least this similar (cosine, -1 to 1)")


def flag_spec(args: argparse.Namespace, cfg: Config, *, texts: Sequence[str] = (),
              files: Sequence[Path] = ()) -> QuerySpec:
    """The query ``search`` makes of ``texts`` and ``files`` (some of ``args.text`` and ``args.files``)
    with the query flags in ``args``; ``QueryFlagError`` (exit code 2) naming a flag that cannot be used."""
    return spec_from_flags(texts=texts, files=files, unlike=args.unlike, folders=args.folder, after=args.after,
                           before=args.before, camera=args.camera, formats=args.formats, top_k=args.top_k,
                           min_similarity=args.min_similarity, source_directory=cfg.source_directory)


def print_summary(summary: IndexSummary, *, file=None) -> None:  # noqa: ANN001  # a text stream
    """What indexing did: ``index``'s output (stdout); before a search's or a report's folder, on stderr,
    so that their stdout holds only the folders (``search ... | head -1``)."""
    print(f"indexed: {summary.embedded} embedded, {summary.relinked} relinked without model work, "
          f"{summary.unchanged} unchanged, {counted(summary.copies, 'copy', 'copies')}, {summary.removed} removed, "
          f"{len(summary.skipped)} skipped", file=file)
    for path, reason in summary.skipped:
        print(f"  skipped {escape(path)}: {reason}", file=file)


def _query_failed(path: Path, reason: str) -> None:
    log.error("query_failed", path=path, reason=reason)
    print(f"failed {escape(path)}: {reason}", file=sys.stderr)


# The search flags that shape each FILE's and --text's query (``querydoc.spec_from_flags``).
QUERY_FLAGS = ("unlike", "folder", "after", "before", "camera", "formats", "top_k", "min_similarity")


def given_flags(args: argparse.Namespace) -> dict[str, object] | None:
    """The query flags given (as a result's ``<stem>.json`` records them: flag names, as typed), or None."""
    given = {f"--{name.replace('_', '-')}" if name != "formats" else "--format": getattr(args, name)
             for name in QUERY_FLAGS if getattr(args, name, None) not in (None, [])}
    return given or None


EMPTY_TEXT = "the text query is empty: give the words to search for"


def _not_a_file(query: Path) -> str | None:
    """Why a typed path can be no query, or None. A path that does not exist is not a file that
    "disappeared" (preprocess's wording)."""
    if query.is_dir():
        return "is a folder, not an image file"
    return None if query.exists() else "no such file"


def _existing(files: Sequence[Path]) -> list[Path]:
    """The FILEs a search can read, each other one failed now: a mistyped name is said at once, not after
    the index run over the library and the model's load."""
    existing = []
    for query in files:
        if (reason := _not_a_file(query)) is None:
            existing.append(query)
        else:
            _query_failed(query, reason)
    return existing


def run_searches(rt: Runtime, files: Sequence[Path] = (), texts: Sequence[str] = (),
                 args: argparse.Namespace | None = None) -> ExitCode:
    """Search with each file (a picture, a ``.txt`` of words or a ``.json`` query document), then each
    text; print each result folder. ``args``: the search command's query flags, applied to each FILE
    and each text (a document carries its own). Returns the exit code (FAILED if any query failed)."""
    given = given_flags(args) if args is not None else None
    status = ExitCode.OK
    for query in files:
        if (reason := _not_a_file(query)) is not None:  # gone while the index was brought up to date
            _query_failed(query, reason)
            status = ExitCode.FAILED
            continue
        try:
            spec = (flag_spec(args, rt.cfg, files=[query])
                    if given is not None and not is_query_document(query) else None)
            print(escape(search_file(query, cfg=rt.cfg, embedder=rt.model(), store=rt.store, spec=spec,
                                     given=given if spec is not None else None).bundle))
        except UnusableFile as exc:
            _query_failed(exc.path, exc.reason)
            status = ExitCode.FAILED
        except NoTextTower as exc:
            _query_failed(query, str(exc))
            status = ExitCode.FAILED
    for text in texts:
        words = text.strip()
        try:
            if not words:
                raise ValueError(EMPTY_TEXT)
            # Checked as a flag's words are (a byte that is not UTF-8, typed at the prompt or given to --text,
            # reached the tokenizer and ended the run), whether or not query flags were given.
            spec = (flag_spec(args, rt.cfg, texts=[words]) if given is not None
                    else spec_from_flags(texts=[words], source_directory=rt.cfg.source_directory))
            print(escape(search_query(spec, TextQuery(words), cfg=rt.cfg, embedder=rt.model(), store=rt.store,
                                      given=given).bundle))
        except (ValueError, NoTextTower, QueryFlagError) as exc:
            _query_failed(Path("--text"), str(exc))
            status = ExitCode.FAILED
        except UnusableFile as exc:  # the terms cancel out
            _query_failed(Path("--text"), exc.reason)
            status = ExitCode.FAILED
    return status


def interactive(rt: Runtime, indexer: Indexer) -> ExitCode:
    """The original tool's prompt: the model stays loaded between searches."""
    print("Enter the path of a query image, or words to search for ('reindex' rescans the source folder; "
          "empty line or 'quit' ends).")
    if isinstance(sys.stdin, io.TextIOWrapper):
        sys.stdin.reconfigure(errors="surrogateescape")  # a pasted name in bytes that are not UTF-8
    if sys.stdin.isatty():
        # input() without readline wrote its prompt to stderr (not seen with the log sent elsewhere) and
        # read the arrow keys as text ('\x1b[A' searched for); with it, lines can be edited and recalled.
        try:
            import readline  # noqa: F401
        except ImportError:
            pass
    while True:
        try:
            line = input("query> ").strip()
        except EOFError:
            print()
            return ExitCode.OK
        if line in ("", "quit", "exit", "q"):
            return ExitCode.OK
        if line == "reindex":
            print_summary(indexer.index_folder())
            continue
        path = _typed_path(line)
        if path is not None:
            run_searches(rt, files=[path])
        else:
            print(f"no file named '{escape(line)}': searching for pictures matching these words")
            run_searches(rt, texts=[line])


def _typed_path(line: str) -> Path | None:
    """The file a line typed at the prompt names, if one exists: as typed, as ``names.escape`` text (how
    logs and results show a name whose bytes are not UTF-8), or as a terminal pastes a file dragged onto
    it: quoted or with its spaces escaped (``'/My Pictures/a.jpg'``, ``/My\\ Pictures/a.jpg``), or as a
    ``file://`` address."""
    candidates = [line, unescape(line)]
    try:
        words = shlex.split(line)
    except ValueError:  # an apostrophe in words ("it's red"): no quoting, words
        words = []
    if len(words) == 1:
        candidates.append(words[0])
    if line.startswith("file://"):
        candidates.append(urllib.parse.unquote(urllib.parse.urlsplit(line).path, errors="surrogateescape"))
    for candidate in candidates:
        try:
            path = Path(candidate).expanduser()
            if path.exists():
                return path
        except (RuntimeError, OSError):  # "~sunset ..." (no such user), words longer than a name may be: words
            continue
    return None


def _raise_shutdown(signum: int) -> None:
    raise ShutdownRequested(signum)


def _run(args: argparse.Namespace, cfg: Config) -> int:
    cleanup = cfg.cleanup_on_exit and not args.no_cleanup
    if args.command == "serve":
        from .service import serve

        return serve(cfg, cleanup=cleanup, poll=args.poll)
    if args.command == "search" and given_flags(args) is not None:
        if args.query or any(is_query_document(f) for f in args.files):
            raise QueryFlagError("the query flags shape the searches of a picture or .txt FILE and of --text; a "
                                 "query document carries its own filters and terms: write them in it")
        flag_spec(args, cfg, texts=["(checked before the index is brought up to date)"])
    report = (duplicates_from_flags(folders=args.folder, kind=",".join(args.kind or DUPLICATE_KINDS), source_directory=cfg.source_directory)
              if args.command == "duplicates" else None)  # checked before the index is brought up to date
    status = ExitCode.OK
    if args.command == "search":
        files = _existing([*args.files, *args.query])
        texts = [text for text in args.text if text.strip()]
        for _ in range(len(args.text) - len(texts)):
            _query_failed(Path("--text"), EMPTY_TEXT)
        if len(files) + len(texts) < len(args.files) + len(args.query) + len(args.text):
            status = ExitCode.FAILED
            if not files and not texts:
                return status  # nothing left to search for
    if args.search is not None and not _existing([args.search]):
        return ExitCode.FAILED  # the original interface's --search FILE: said as at once
    install_stop_handlers(_raise_shutdown)  # unwinds through open_runtime's cleanup
    with open_runtime(cfg, cleanup=cleanup) as rt:
        indexer = Indexer(cfg, rt.model(), rt.store)
        try:
            summary = indexer.index_folder()
            answers = args.command in ("search", "duplicates") or args.search is not None  # stdout: folders only
            print_summary(summary, file=sys.stderr if answers else sys.stdout)
            if args.command == "index" or args.process_only:
                return ExitCode.OK
            if report is not None:
                from .duplicates import Kind, write_report

                print(escape(write_report(cfg, rt.store, kinds=[Kind(k) for k in report.kinds], folders=report.folders)))
                return ExitCode.OK
            if args.command == "search":
                return max(status, run_searches(rt, files, texts, args))
            if args.search:
                return run_searches(rt, [args.search])
            return interactive(rt, indexer)
        finally:
            indexer.close()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config is None:
        parser.error("--config PATH (or --env PATH) is required")
    if args.command is not None and (args.process_only or args.search is not None):
        legacy = "--process-only" if args.process_only else "--search"
        parser.error(f"{legacy} is the original interface, a command of its own: give it without "
                     f"'{args.command}' (or use 'index' / 'search FILE')")
    if args.command == "search" and not args.files and not args.text and not args.query:
        parser.error("search needs a FILE (a picture or a .txt file of words), --text WORDS or --query PATH")
    configure_logging(args.log_level)
    # A developer asks for the traceback with --log-level debug; everyone else gets one line.
    show_traceback = args.log_level == "debug"
    try:
        cfg = load_config(args.config)
        return _run(args, cfg)
    except ImageSearchError as exc:
        fix = {"action": exc.action} if exc.action else {}
        log.error(exc.event, reason=str(exc), **fix, exc_info=show_traceback)
        return exc.exit_code
    except ShutdownRequested as exc:
        log.info("stopped", signal=str(exc))
        return 128 + exc.signum
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Whoever read the output went away (``search ... | head -1``): not a failure of the run. What is
        # left to print goes nowhere, and the exit code is the shell's for a process its pipe ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except psycopg2.Error as exc:
        # A server that crashed mid-query can break a statement with a bare psycopg2 error the store did
        # not wrap as DatabaseUnavailable: still the database's kind of failure, and its exit code.
        log.error(DatabaseFailure.event, reason=f"the database failed mid-run ({describe(exc)}): check that PostgreSQL "
                  "is running and reachable; an embedded one starts again with the next run", exc_info=show_traceback)
        return DatabaseFailure.exit_code
    except Exception as exc:  # a bug, or a failure nobody foresaw: still one line, not a stack trace
        log.error("crashed", reason=describe(exc), exc_info=show_traceback)
        return ExitCode.FAILED


if __name__ == "__main__":
    sys.exit(main())
