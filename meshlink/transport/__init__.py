"""Transports: the byte streams the bus and the disks run over.

``vchan`` (shared-memory rings, local or Xen provider), ``tls`` (TLS over
TCP), the Unix-socket ``rendezvous`` that hands shared memory and event
descriptors to a co-located peer, and the ``doorbell`` every shared-memory
waiter sleeps on.  Names belong to :mod:`resolver`; two modules meet it:
``dial`` opens the endpoints it ranks, ``xenstore`` gives its XenStore
registry the native XenStore client.  Nothing here knows about the bus.
"""
