"""``edge web passwd`` and ``edge web token``: the secrets of the local web page and REST
API (:mod:`edge.web.auth`), made for pasting into the agent file. Only their hashes go
there; the password stays with its user, the token is shown once."""

from __future__ import annotations

import json

import click

MIN_PASSWORD_CHARS = 8  # NIST SP 800-63B's minimum for passwords users choose


@click.group()
def web() -> None:
    """Users and API tokens of the local web page."""


def _password(value: str) -> str:
    if len(value) < MIN_PASSWORD_CHARS:
        raise click.UsageError(f"at least {MIN_PASSWORD_CHARS} characters, please")
    return value


@web.command()
@click.option("--user", "name", default="admin", show_default=True, help="The user name.")
def passwd(name: str) -> None:
    """Hash a new password for web.users (asked twice, not shown)."""
    from edge.web.auth import hash_password  # noqa: PLC0415 (aiohttp only when needed)

    password = click.prompt("Password", hide_input=True, confirmation_prompt=True,
                            value_proc=_password)
    encoded = hash_password(password)
    click.echo("Paste under web.users in the agent file:")
    click.echo(f"  - {{name: {json.dumps(name)}, password_hash: {json.dumps(encoded)}}}")


@web.command()
def token() -> None:
    """Print a new API token (only now) and its web.tokens entry."""
    from edge.web.auth import new_token  # noqa: PLC0415 (aiohttp only when needed)

    secret, stored = new_token()
    click.echo('The token, shown only now; the client sends "Authorization: Bearer <token>":')
    click.echo(f"  {secret}")
    click.echo("Paste under web.tokens in the agent file:")
    click.echo(f"  - {json.dumps(stored)}")
