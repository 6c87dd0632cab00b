"""A line server on numpy and fakeredis that answers with datetime.now().

numpy imports the C datetime API at import; fakeredis imports numpy-free
redis-py but is what the issue saw fail. ``now`` answers the clocks as
datetime, date and numpy see them, ``set K V``/``get K``/``incr K`` go to an
in-process fake Redis, ``mean X Y ...`` to numpy, ``pickle`` round-trips
datetimes numpy made.
"""

import datetime
import pickle
import socketserver
import sys

import fakeredis
import numpy

store = fakeredis.FakeRedis()


def answer(words: list[str]) -> str:
    if words[0] == "now":
        now = datetime.datetime.now()
        utc = datetime.datetime.now(datetime.UTC)
        return " ".join(
            [
                now.isoformat(),
                utc.isoformat(),
                datetime.datetime.utcnow().isoformat(),
                datetime.date.today().isoformat(),
                str(numpy.datetime64(now, "us")),
                repr(type(now)),
            ]
        )
    if words[0] == "pickle":
        # numpy makes datetimes through the C API: they must pickle, compare and check too.
        made_in_c = numpy.datetime64("2020-01-02T03:04:05").item()
        back = pickle.loads(pickle.dumps([made_in_c, datetime.datetime(2021, 5, 6)]))
        checks = [isinstance(made_in_c, datetime.datetime), back[0] == made_in_c]
        return f"{back[0]!r} {back[1]!r} {checks}"
    if words[0] == "set":
        return str(store.set(words[1], words[2]))
    if words[0] == "get":
        value = store.get(words[1])
        return "nil" if value is None else value.decode()
    if words[0] == "incr":
        return str(store.incr(words[1]))
    if words[0] == "mean":
        return repr(float(numpy.mean(numpy.array([float(w) for w in words[1:]]))))
    return "unknown command"


class Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        for line in self.rfile:
            self.wfile.write(answer(line.decode().split()).encode() + b"\n")


with socketserver.TCPServer(("127.0.0.1", int(sys.argv[1])), Handler) as server:
    print("listening", flush=True)
    server.serve_forever()
