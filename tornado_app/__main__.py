"""Command line: ``python -m tornado_app --config FILE [--host H] [--port P] [COMMAND]``.

Without a command it serves. Commands: ``users add|list|disable|revoke|promote|forget|quota``,
``token``, ``db upgrade|current``, ``analytics REPORT|export|purge|rollup``. Every
failure is one clear line on stderr and a non-zero exit code (2 for configuration
and usage mistakes), never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import shutil
import sys
from pathlib import Path

from . import auth, quota_cli
from .analytics import cli as analytics_cli
from .config import ConfigError, Settings, load_settings
from .logs import setup_logging
from .store import Conflict, Store, StoreUnavailable
from .store import schema

EXIT_FAILURE = 1
EXIT_USAGE = 2
PASSWORD_MIN = 8



class CommandError(Exception):
    """A command that cannot be done; the text is the line to print."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tornado_app", description="AI chat WebSocket service"
    )
    parser.add_argument("--config", help="YAML config file (default: built-in defaults)")
    parser.add_argument("--host", help="override server.host")
    parser.add_argument("--port", type=int, help="override server.port")
    parser.add_argument("--processes", type=int, help="override server.processes")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="serve (the default)")

    users = commands.add_parser("users", help="manage users").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    add = users.add_parser("add", help="add a user (asks for the password)")
    add.add_argument("name")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.add_argument("--admin", action="store_true", help="give the user the admin flag")
    users.add_parser("list", help="list users")
    disable = users.add_parser("disable", help="disable a user: no new logins; open sockets close")
    disable.add_argument("name")
    revoke = users.add_parser("revoke", help="revoke every token issued to a user until now")
    revoke.add_argument("name")
    promote = users.add_parser("promote", help="give a user the admin flag (analytics API)")
    promote.add_argument("name")
    forget = users.add_parser("forget", help="delete every memory a user saved")
    forget.add_argument("name")
    quota_cli.add_parser(users)

    token = commands.add_parser("token", help="print an access token for a user")
    token.add_argument("name")
    token.add_argument("--ttl-minutes", type=int, help="lifetime (default: auth.token_ttl_minutes)")

    db = commands.add_parser("db", help="database schema").add_subparsers(
        dest="action", metavar="ACTION", required=True
    )
    db.add_parser("upgrade", help="migrate the database to the newest schema")
    db.add_parser("current", help="print the database's schema revision")
    analytics_cli.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        if args.host:
            settings.server.host = args.host
        if args.port is not None:
            settings.server.port = args.port
        if args.processes is not None:
            if args.processes < 1:
                raise ConfigError("--processes: must be at least 1")
            settings.server.processes = args.processes
        setup_logging(settings.logging)
        if args.command in (None, "serve"):
            return serve(settings, args.config)
        return asyncio.run(run_command(settings, args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except schema.SchemaError as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


def serve(settings: Settings, config_path: str | None) -> int:
    if settings.server.processes > 1:
        share_metrics_between_processes(settings)
    # Imported here: the app loads the agent plugins, which the other commands need not.
    from .agents import available_agents, validate_agent_settings
    from .app import run
    from .toolbox import available_tools, validate_tool_settings

    # Refuse an unknown agent or tool, or bad plugin options, before anything starts.
    validate_agent_settings(settings, available_agents())
    validate_tool_settings(settings, available_tools())
    try:
        run(settings, config_path)
    except OSError as exc:
        raise CommandError(
            f"cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror}"
        ) from None
    except StoreUnavailable as exc:
        raise CommandError(f"{exc}; check database.url") from None
    return 0


def share_metrics_between_processes(settings: Settings) -> None:
    """Point prometheus-client's multi-process mode at an empty folder. It must
    happen before tornado_app.metrics is first imported."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return  # the operator chose one
    folder = Path(settings.data_dir) / "prometheus"
    shutil.rmtree(folder, ignore_errors=True)  # samples of an earlier run
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)


async def run_command(settings: Settings, args: argparse.Namespace) -> int:
    database = settings.database
    store = Store.from_url(database.url, database.echo, database.timeout_seconds)
    try:
        if args.command == "db":
            return await db_command(store, args)
        await ensure_current(store)
        if args.command == "users":
            return await users_command(store, args)
        if args.command == "token":
            return await token_command(store, settings, args)
        if args.command == "analytics":
            return await analytics_cli.run(store, settings, args)
        raise CommandError(f"unknown command {args.command}")
    except StoreUnavailable as exc:
        raise CommandError(f"{exc}; check database.url") from None
    finally:
        await store.close()


async def ensure_current(store: Store) -> None:
    """Create the schema of an empty database; refuse an outdated one."""
    await store.ensure_schema()


async def db_command(store: Store, args: argparse.Namespace) -> int:
    if args.action == "upgrade":
        before = await store.schema_revision()
        if before is not None and not schema.is_known_revision(before):
            raise schema.SchemaError(schema.unknown_revision_message(before))
        await store.upgrade_schema()
        after = await store.schema_revision()
        print(f"database at revision {after}" + ("" if before == after else f" (was {before})"))
    else:
        current = await store.schema_revision()
        head = schema.head_revision()
        if current is None:
            print("empty (no schema yet; run db upgrade, or start the server)")
        elif current == head:
            print(f"{current} (head)")
        elif schema.is_known_revision(current):
            print(f"{current} (behind head {head}; run db upgrade)")
        else:
            raise schema.SchemaError(schema.unknown_revision_message(current))
    return 0


async def users_command(store: Store, args: argparse.Namespace) -> int:
    if args.action == "add":
        name = validate_username(args.name)
        password = read_password(args.password_stdin)
        try:
            await store.create_user(name, auth.hash_password(password), is_admin=args.admin)
        except Conflict as exc:
            raise CommandError(str(exc)) from None
        print(f"added user {name}" + (" (admin)" if args.admin else ""))
    elif args.action == "list":
        rows = await store.list_users()
        print(f"{'USERNAME':<24} {'ADMIN':<6} {'DISABLED':<9} {'CREATED':<17} QUOTA")
        for user in rows:
            print(f"{user.username:<24} {'yes' if user.is_admin else 'no':<6} "
                  f"{'yes' if user.disabled else 'no':<9} {user.created_at:%Y-%m-%d %H:%M}  "
                  f"{quota_cli.describe(user)}")
    elif args.action == "disable":
        if not await store.set_disabled(args.name):
            raise CommandError(f"no user named {args.name!r}")
        print(f"disabled user {args.name}")
    elif args.action == "revoke":
        if not await store.revoke_all_tokens(args.name):
            raise CommandError(f"no user named {args.name!r}")
        print(f"revoked every token of {args.name} issued until now")
    elif args.action == "quota":
        print(await quota_cli.run(store, args, CommandError))
    elif args.action == "promote":
        if not await store.set_admin(args.name):
            raise CommandError(f"no user named {args.name!r}")
        print(f"{args.name} is now an admin")
    elif args.action == "forget":
        forgotten = await store.forget_memories(args.name)
        if forgotten is None:
            raise CommandError(f"no user named {args.name!r}")
        print(f"deleted {forgotten} memories of {args.name}")
    return 0


async def token_command(store: Store, settings: Settings, args: argparse.Namespace) -> int:
    user = await store.get_user(args.name)
    if user is None:
        raise CommandError(f"no user named {args.name!r}")
    if user.disabled:
        raise CommandError(f"user {args.name!r} is disabled")
    ttl = settings.auth.token_ttl_minutes if args.ttl_minutes is None else args.ttl_minutes
    if ttl < 1:
        raise CommandError("--ttl-minutes must be at least 1")
    print(auth.TokenVerifier.from_settings(settings).issue(user.username, ttl))
    return 0


def validate_username(name: str) -> str:
    if not auth.valid_username(name):
        raise CommandError(auth.USERNAME_RULE)
    return name


def read_password(from_stdin: bool) -> str:
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise CommandError("the passwords differ")
    else:
        raise CommandError("no terminal to ask for a password: use --password-stdin")
    if len(password) < PASSWORD_MIN:
        raise CommandError(f"passwords must have at least {PASSWORD_MIN} characters")
    return password


if __name__ == "__main__":
    sys.exit(main())
