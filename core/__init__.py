"""The base every worker stands on: settings, Kafka clients and topics, the embedded broker,
Delta helpers, contracts, model declarations, metrics, logging."""
