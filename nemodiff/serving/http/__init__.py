"""Place: checkpoint → builder → engine dir → runtime → [serving/http]. The HTTP ports `nemodiff serve` owns.

front.py: the public HTTP port, in front of Triton's own HTTP endpoints (which listen on an internal
loopback port): it checks every body (size, UTF-8, JSON and its nesting depth) before Triton's JSON
parser sees it, asks for the API key, answers refusals with 503 and Retry-After, and cancels a
request whose client hung up. guard.py: those checks, shared with the OpenAI API. server.py: uvicorn
on a thread, with a deadline for a client to send its request (slow or half-sent connections are
closed). Imports: nemodiff/serving/ (errors, control).
"""
