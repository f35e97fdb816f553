"""The cost of one fast refusal (accept, read the request, send a 503,
close), the old way (socket.accept() and a socket object) against the
bare-descriptor way mailpush uses (accept4, os calls). A client process
opens N connections and waits; the server side then refuses them all.

    .venv/bin/python bench/shed_cost.py
"""
import os
import select
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
from mailpush.rawsock import accept_fd, refuse_fd
RESP = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 33\r\nConnection: close\r\n\r\nserver overloaded, retry shortly\n"
REQ = b"GET /v1/ws?token=xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
N = 3000
def with_socket_objects(l):
    s, _ = l.accept()
    s.setblocking(False)
    try: s.recv(8192)
    except OSError: pass
    try: s.send(RESP)
    except OSError: pass
    s.close()
def bare_descriptors(l):
    refuse_fd(accept_fd(l), RESP)
for rnd in range(3):
  for name, fn in (("socket objects", with_socket_objects), ("bare descriptors", bare_descriptors)):
    l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); l.bind(("127.0.0.1", 0)); l.listen(65535)
    port = l.getsockname()[1]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        ep = select.epoll(); socks = []
        for i in range(N):
            c = socket.socket(); c.bind((f"127.0.3.{i % 200 + 1}", 0)); c.connect(("127.0.0.1", port)); c.send(REQ); c.setblocking(False); socks.append(c); ep.register(c, select.EPOLLIN)
        os.write(w, b"x")
        got = 0
        while got < N:
            for fd, ev in ep.poll(1):
                try: d = os.read(fd, 4096)
                except OSError: d = b""
                ep.unregister(fd); got += 1
        os._exit(0)
    os.read(r, 1); time.sleep(0.2)
    c0 = time.process_time(); t0 = time.perf_counter()
    for _ in range(N): fn(l)
    t1 = time.perf_counter(); c1 = time.process_time()
    os.waitpid(pid, 0); l.close()
    print(f"{name:>16}: {(t1-t0)/N*1e6:.1f} us wall, {(c1-c0)/N*1e6:.1f} us cpu per refusal")
