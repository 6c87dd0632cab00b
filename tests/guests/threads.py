"""A guest that starts a thread, which ftproxy refuses."""

import threading

print("starting a thread", flush=True)
threading.Thread(target=print, args=("from the thread",)).start()
print("not reached", flush=True)
