"""Message kinds of the same-node protocol.

A message is a tuple ``(KIND, *fields)``. Kinds are small ints so dispatch is one dict
lookup. ``rid`` fields pair a request with its ``REPLY``.

Client (driver or worker core worker) <-> node manager
    REGISTER(rid, info)              -> REPLY(rid, ok, node_info)
    REQUEST_LEASE(rid, resources)    -> REPLY(rid, ok, (worker_id, socket_path) | error)
    RETURN_LEASE(worker_id, disconnect)
    LEASE_WANTED()                   node -> client: return idle leases, others wait
    BLOCKED() / UNBLOCKED()          a worker blocked in get/wait lends its CPU back
    STORE_RESERVE(rid, oid, size)    -> REPLY(rid, ok, None | error)
    STORE_SEAL(rid, oid, size)       -> REPLY(rid, ok, None): the segment is complete
    STORE_ENSURE(rid, oid)           -> REPLY(rid, ok, bool): restore a spilled object
    STORE_FREE(oids)
    STORE_ABORT(oid)
    NODE_INFO(rid, reclaim)          -> REPLY(rid, ok, dict); reclaim: idle leases back first
    KILL_WORKER(worker_id)           force-cancel: the node manager SIGKILLs it
    LOG_LINES(lines)                 node -> driver: [(is_err, prefix, text)]
    SHUTDOWN()                       embedded driver -> node: stop everything
    FLUSH_LOGS(rid)                  -> REPLY once worker output so far was forwarded

Actors (the node manager runs each actor's life on its node)
    CREATE_ACTOR(rid, spec)          client -> node: -> REPLY(rid, ok, None | error)
    WATCH_ACTOR(actor_id)            client -> node: send me ACTOR_STATE now and on changes
    ACTOR_STATE(record)              node -> client: state, worker address, cause
    KILL_ACTOR(actor_id, no_restart) client -> node
    BECOME_ACTOR(spec)               node -> worker: construct the actor
    ACTOR_CREATED(actor_id, error)   worker -> node: error is None or a serialized error
    ACTOR_EXITING(actor_id, cause)   worker -> node: intentional exit, do not restart

Core worker <-> core worker (caller to leased worker, borrower to owner)
    HELLO(worker_id, job_id, paths)  first message on a connection: who calls, for which
                                     job, and the directories its code imports from
    FUNCTION(fn_id, blob)            sent once per connection before tasks that use it
    PUSH_TASK(spec)                  -> TASK_DONE(task_id, results, worker_error)
    CANCEL_TASK(task_id, force, recursive)
    RETIRING()                       worker -> caller: last reply sent, exiting on purpose
    STEAL(n)                         caller -> worker: give back up to n tasks not started
    STOLEN(task_ids)                 worker -> caller: these never ran; run them elsewhere
    GET_OBJECT(rid, oid)             -> REPLY(rid, ok, (kind, payload)) once ready
    ADD_BORROWER(oids) / REMOVE_BORROWER(oids)
    REPLY(rid, ok, value)
"""

REPLY = 0
REGISTER = 1
REQUEST_LEASE = 2
RETURN_LEASE = 3
LEASE_WANTED = 4
BLOCKED = 5
UNBLOCKED = 6
STORE_RESERVE = 7
STORE_SEAL = 8
STORE_ENSURE = 9
STORE_FREE = 10
STORE_ABORT = 11
NODE_INFO = 12
KILL_WORKER = 13
LOG_LINES = 14
SHUTDOWN = 15
FLUSH_LOGS = 16
CREATE_ACTOR = 17
WATCH_ACTOR = 18
ACTOR_STATE = 19
KILL_ACTOR = 30
BECOME_ACTOR = 31
ACTOR_CREATED = 32
ACTOR_EXITING = 33

HELLO = 20
FUNCTION = 21
PUSH_TASK = 22
TASK_DONE = 23
CANCEL_TASK = 24
GET_OBJECT = 25
ADD_BORROWER = 26
REMOVE_BORROWER = 27
RETIRING = 28
STEAL = 29
STOLEN = 35

# Result kinds inside TASK_DONE and GET_OBJECT replies.
RESULT_INLINE = 0     # payload: serialized bytes
RESULT_IN_STORE = 1   # payload: size; the object is sealed in the node's shared-memory store
RESULT_ERROR = 2      # payload: serialized exception (TaskError or a system error)
