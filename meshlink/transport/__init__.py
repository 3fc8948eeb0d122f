"""Transports: the byte streams the bus and the disks run over.

``vchan`` (shared-memory rings, local or Xen provider), ``tls`` (TLS over
TCP), the Unix-socket ``rendezvous`` that hands shared memory and event
descriptors to a co-located peer, and the ``doorbell`` every shared-memory
waiter sleeps on.  Nothing here knows about names or the bus.
"""
