"""`python manage.py ensure_database`: create the database of DATABASE_URL if missing.

A release task, run before `migrate`: a new (ad hoc) environment gets its own
database on the shared PostgreSQL server. Connects to the `postgres`
maintenance database with the same credentials. Safe to run again, and safe to
run twice at once.
"""
import psycopg
from psycopg import errors, sql

from django.core.management.base import BaseCommand, CommandError
from django.db import connections


class Command(BaseCommand):
    requires_system_checks = []
    help = "Create the database named in DATABASE_URL if it does not exist (PostgreSQL)."

    def add_arguments(self, parser):
        parser.add_argument("--database", default="default", help="Django database alias (default: default)")
        parser.add_argument(
            "--maintenance-db", default="postgres", help="database to connect to for CREATE DATABASE (default: postgres)"
        )

    def handle(self, *args, database, maintenance_db, **options):
        conn = connections[database]
        if conn.vendor != "postgresql":
            self.stdout.write(f"ensure_database: {conn.vendor} database, nothing to do")
            return
        cfg = conn.settings_dict
        name = cfg["NAME"]
        params = {
            "dbname": maintenance_db,
            "user": cfg.get("USER") or None,
            "password": cfg.get("PASSWORD") or None,
            "host": cfg.get("HOST") or None,
            "port": cfg.get("PORT") or None,
            **{k: v for k, v in (cfg.get("OPTIONS") or {}).items() if k in ("sslmode", "connect_timeout", "sslrootcert")},
        }
        params = {k: v for k, v in params.items() if v is not None}
        where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        try:
            with psycopg.connect(**params, autocommit=True) as pg:
                exists = pg.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
                if exists:
                    self.stdout.write(f"ensure_database: database {name!r} exists on {where}")
                    return
                try:
                    pg.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except (errors.DuplicateDatabase, errors.UniqueViolation):
                    # A concurrent CREATE DATABASE of the same name won the race.
                    self.stdout.write(f"ensure_database: database {name!r} was just created by someone else")
                    return
        except psycopg.OperationalError as exc:
            raise CommandError(f"cannot connect to PostgreSQL at {where} (database {maintenance_db!r}): {exc}")
        except psycopg.errors.InsufficientPrivilege as exc:
            raise CommandError(f"not allowed to create database {name!r} on {where}: {exc}")
        self.stdout.write(self.style.SUCCESS(f"ensure_database: created database {name!r} on {where}"))
