"""``quotagate serve --workers N``: the LLM API served by N processes on one port, limits exact across them.

- ``supervisor.py``: the parent's side: listening sockets, starting and restarting the workers;
- ``hub.py``: the parent's end of each worker's control channel: the shared limiter (embedded default)
  and key changes sent to every worker;
- ``link.py``: a worker's end: the ``Limiter`` that asks the parent, and key changes;
- ``channel.py``: what travels on the channel;
- ``main.py``: a worker process.
"""
