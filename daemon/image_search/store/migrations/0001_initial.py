"""The tables that need no vector size: the metadata markers and the fleet's members and claims."""

# Markers an earlier version left (schema.IDENTITY, schema.NAMES); still written for older programs.
CREATE_META = "CREATE TABLE IF NOT EXISTS image_search_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
# Liveness is judged by the database's clock alone (now() against heartbeat_at), so the hosts' clocks
# never need to agree. Both tables are UNLOGGED: they are coordination, not data, so their commits wait
# for no WAL flush (claim + release of a batch: about 0.5 ms instead of 1 ms, measured here). A server
# crash empties them: each heartbeat registers its member again, and a lost claim costs at most one
# file embedded twice (the rows stay one per content hash).
CREATE_MEMBERS = """
CREATE UNLOGGED TABLE IF NOT EXISTS image_search_members (
    id BIGSERIAL PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    model_name TEXT NOT NULL,
    dimension INTEGER NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
CREATE_CLAIMS = """
CREATE UNLOGGED TABLE IF NOT EXISTS image_search_claims (
    item TEXT PRIMARY KEY,
    member_id BIGINT NOT NULL,
    claimed_at TIMESTAMPTZ NOT NULL DEFAULT now()
)
"""
CREATE_CLAIMS_BY_MEMBER = "CREATE INDEX IF NOT EXISTS image_search_claims_member_idx ON image_search_claims (member_id)"


def apply(context) -> bool:  # IF NOT EXISTS: an earlier version may have created any of them
    for statement in (CREATE_META, CREATE_MEMBERS, CREATE_CLAIMS, CREATE_CLAIMS_BY_MEMBER):
        context.cur.execute(statement)
    return True
