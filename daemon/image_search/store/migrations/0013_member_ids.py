"""The fleet members' ids come from ``image_search_member_ids``, a logged sequence.

``image_search_members`` is UNLOGGED (coordination, not data), and so was its own id sequence. A server
crash (a backend killed by the OOM killer, a power cut) empties both, and the ids began again at 1,
while the members that lived through it came back under their old ids (``store.fleet._REJOIN``). A
member joining then got a live member's id: its start failed on the key (exit 1), or two processes
shared one member, and a command's leave emptied the table under a running service. A logged sequence is
recovered with the rest of the database and never gives an id twice. The column's default is changed,
not the statement that joins, so an earlier version joining the same database draws from it too.
"""

NEEDS_DIMENSION = False

CREATE_SEQUENCE = "CREATE SEQUENCE IF NOT EXISTS image_search_member_ids"
# Above every id given so far: the old sequence's, the rows' and (applied again after a lost record) its own.
START_ABOVE_EVERY_ID = """
SELECT setval('image_search_member_ids', GREATEST(
    (SELECT last_value FROM image_search_member_ids),
    (SELECT last_value FROM image_search_members_id_seq),
    (SELECT coalesce(max(id), 1) FROM image_search_members)))
"""
DRAW_FROM_IT = "ALTER TABLE image_search_members ALTER COLUMN id SET DEFAULT nextval('image_search_member_ids')"


def apply(context) -> bool:
    for statement in (CREATE_SEQUENCE, START_ABOVE_EVERY_ID, DRAW_FROM_IT):
        context.cur.execute(statement)
    return True
