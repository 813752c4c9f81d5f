"""The GPU arbiter (the "traffic cop"): who may use the GPU now, and what must leave it first.

Every GPU-heavy path (chat, render, warm-up; UI and API alike) asks for a *lease*; nothing touches the
GPU or sends a request to Ollama before its lease is granted. The module has two halves:

* `plan(snapshot)` is the policy: a pure function from the state (what is resident, what runs, what
  waits, the budget) to the grants it allows now, each with the tenants to evict first. It does not
  log, lock or mutate, so it is tested as a table and can be called speculatively.
* `Arbiter` is the shell: it keeps the state under one lock, applies `plan()`, and runs the evictions
  through the tenants' `evict()` callables, outside the lock, in the thread of the request that needs
  the memory.

Invariants (tests in tests/test_arbiter_*.py hold each one; tests/test_arbiter_props.py checks them all
after every step of random runs):

1. A request uses the GPU only between its grant (and the evictions in its plan) and its release.
   A chat held back by a render is not sent to Ollama before then: Ollama does not refuse a load when
   VRAM is short, it silently spills layers to the CPU (docs/facts.md, "Ollama").
2. At most one render runs at a time (a diffusers pipeline keeps per-call state).
3. Every grant is planned within the budget: right after a grant, the ledger (every resident's
   footprint: its peak need while busy, its weights while idle, the larger of that and what it last
   reported; plus memory held by other programs, a fixed tenant that is never evicted) less the
   tenants that are leaving for it fits the budget, unless Clair has one tenant on the GPU (a lone
   tenant may exceed it: refusing would help no one). With no known budget (no CUDA device, none
   configured) or the `exclusive` policy, a grant leaves one of Clair's tenants on the GPU. A reading
   may later show a tenant larger than planned: that is counted (`budget_exceeded`) and every later
   plan uses the larger size. (A worst case assumed after a failed reading is planned on, but not
   counted as a breach: it is not a measurement.)
4. Only idle tenants are evicted, and a tenant being evicted still counts in the ledger until its
   `evict()` has returned: nobody plans on memory that is not free yet (Ollama answers an unload
   before the memory is back), and no request starts on a tenant that is leaving.
5. A request starts only when it fits beside what runs, and never overtakes a waiting request it
   could not run beside. Both checks compare the same sizes, `size()`: a request's need, or its
   tenant's size in the ledger when that is larger. So a waiting render stops new chats from
   joining, and with `chat_priority="next"` a chat queues behind at most one render. The queue order
   is the shell's: with preemption on, a chat that arrives while chats stream is ordered ahead of the
   render waiting for them during that render's first `render_slice_s` of waiting (or of a pause), so
   it joins them without a swap; a render therefore waits at most `render_slice_s` plus the longest chat.
6. No starvation and no idling: when nothing runs, nothing waits (the first request in line fits
   alone). With 5, a waiting request is granted once the leases ahead of it or in its way (finitely
   many: later arrivals cannot get in its way) have been released.
7. Unknown is never empty: a tenant leaves the ledger only on a successful reading that shows it gone,
   or when its own `evict()` returned. A failed reading keeps it (or adds it), at the worst size the
   caller knows (`Resident.unknown` until a reading or a grant replaces the assumption).
8. Every lease is released exactly once, whatever happens (error, cancel, client gone): `release()`
   is idempotent and `Lease` is a context manager. A failed eviction releases the lease too, and the
   tenant it failed to evict stays in the ledger.
9. A running render pauses only at a denoising step boundary, and only when `should_yield()` finds
   that pausing lets a waiting chat start (a chat that fits beside the render runs beside it instead).
   One pause serves every chat that waits when it begins and every chat that arrives while it lasts,
   within its bounds (`joins_pause`: the first `pause_join_s` (10 s) of the pause, at most
   `max_pause_chats` (8), and only while the pause's chats still run, so no swap is needed): those are queued ahead of the paused render, so it resumes only when none of
   them waits. A chat that arrives later queues behind it, and once it runs, pauses it again at the next
   step: `render_slice_s` counts from the start of the last pause, so it bounds how often a render
   pauses, not how long a chat waits (a pause with a swap lasts longer than the slice). A render in its
   tail (its decode, see `Arbiter.shrink`) never pauses. A paused render holds no lease: its tenant
   counts at its idle size and is evicted like any idle tenant if a chat needs the room.
   Chats cannot starve a render: it pauses at most `max_preemptions` times, not again once it has been
   paused `max_paused_s` (60 s) in all, and each pause lasts at most `pause_join_s` plus the longest of at most
   `max_pause_chats` + (the chats waiting when it began) chats. So a render's pauses add at most
   min(`max_preemptions` x that, `max_paused_s` + one pause) to its time. Under `always`, where the chats
   could run beside the render (they fit), a render can be held to `max_pause_share` of its elapsed time
   (`pause_budget`; 1, the default, sets no such budget): past it no pause begins and no chat joins one,
   the render resumes beside its chats at the next hand-over, and chats that fit share the GPU with it
   from then on (`Req.shares`), as under `auto`. So its pauses add about share / (1 - share) to its
   running time (0.2: 25 %), plus the replies already admitted when the budget ran out.
10. `Arbiter._lock` guards all of the state below it and is held only to read or change that state:
   never across an eviction, a load, a render or any I/O. Methods suffixed `_locked` expect it held.
   Leases are not bound to threads (Gradio runs each step of a streaming handler on any worker
   thread), so no thread-owned lock is ever held for the length of a lease. Under the lock the shell
   also wakes a lease's waiters when it grants or withdraws it: `_cond.notify_all()` for threads
   (`Lease.wait`), and for event loops (`Lease.wait_async`) `loop.call_soon_threadsafe` on a future,
   which only queues a callback, so the lock is still never held across I/O or a wait.
11. A render's tail: once its denoising loop is done and its UNet and text encoders have left the GPU,
   `Arbiter.shrink()` lowers its need to the VAE decode's peak (sizes only go down), so a chat, or the
   chat model's reload, that fits beside the decode is granted at once instead of after it.
12. Estimates only: a holder reports its progress (`Lease.progress(done, total)`: denoising steps or
   tokens) without the lock, into fields of its own lease that only it writes; the estimates read them
   under the lock and may see them a step stale. Nothing the policy decides depends on them.
13. Waiting costs no thread: a request waiting on an event loop (`Lease.waiting_async`) is a future
   and a suspended task. A thread is taken only for the GPU work after the grant (its evictions, then
   the render or the reply), so the queue's length is bounded by CLAIR_MAX_QUEUE, not by the server's
   worker threads (tests/test_waiting.py counts them with 256 waiting).
14. A tenant of several parts (Ollama's models, `Req.parts`) counts every part its grants brought, side by
   side, until a reading taken while none of its requests ran says what is left: two chats for different
   models, each sized before the other's model loaded, hold both, and the end of one does not shrink the
   ledger to its own model while Ollama keeps the other loaded (a render would be planned into that
   memory). While requests of it run, a reading by model takes out a part it no longer shows that no running
   request brings (`Req.brings`: only a request loads a model, so Ollama let that one go), so chats for
   different models that keep overlapping do not hold every model any of them ever brought.
15. The card has the last word (`Studio.preflight`, outside the arbiter): the plan is made from the
   ledger, but memory can change hands between a plan and the work it granted (a program allocates after
   the last reading; a runner Ollama unloaded gives its memory back a little after `/api/ps` empties). So
   before a grant's first allocation (a render's weights and activations, a chat's model that is not
   loaded yet) Clair reads the card, and when it is short it re-reads who holds what, evicts every idle
   tenant (`evict_idle`) and waits for the memory. What no scheduler can prevent is a program allocating
   in the milliseconds between that look and the allocation: the allocation then fails and heals
   (clair/engines/image.py, the retries). Another program's share of the card is the card's use less ours
   less the smaller of Ollama's last reading and its ledger entry, so a reading taken before an eviction
   cannot hide another program's memory.
"""

from clair.arbiter.policy import *  # noqa: F403
from clair.arbiter.policy import _conflict, _fit  # noqa: F401
from clair.arbiter.shell import *  # noqa: F403
