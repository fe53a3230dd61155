"""The continuous-batching engine: requests in, token events out, over one model's decode slots.

`BatchEngine` (engine.py) admits `GenerationRequest`s (api.py) into decode slots, which the scheduler thread
(worker.py) moves with the device programs (device.py: prefill / insert / decode). Jobs and choices
(job.py, choice.py) turn tokens into text events with stop strings and logprobs.
"""
