"""callstream: contact-center calls and tickets in, routed and summarized work out.

Layout: core/ (settings, Kafka I/O, batching, gRPC plumbing, metrics) and one package per service:
transcriber/, router/, summarizer/, llm_engine/. Each service has settings.py (its typed settings),
engine or model code (where the model runs), service.py (where requests enter from gRPC and Kafka and
where results leave).
"""

__version__ = "0.1.0"
