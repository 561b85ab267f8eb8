"""Metric names shared by training, serving and the monitor: Prometheus style, base units.

The same names appear as keys in ``metrics.jsonl`` and as Prometheus series, so one reader handles both.
"""

STEP = "step"
TRAIN_LOSS = "train_loss"
LEARNING_RATE = "learning_rate"
GRAD_NORM = "grad_norm"
TRAIN_SAMPLES_TOTAL = "train_samples_total"
TRAIN_SAMPLES_PER_SECOND = "train_samples_per_second"
TRAIN_STEP_SECONDS = "train_step_seconds"
TRAIN_RANK_BATCH_SAMPLES = "train_rank_batch_samples"  # + "_rank<R>": each data rank's balanced share
DATA_WAIT_SECONDS = "train_data_wait_seconds"
AMP_SKIPPED_STEPS_TOTAL = "amp_skipped_steps_total"
AMP_LOSS_SCALE = "amp_loss_scale"
NONFINITE_SKIPPED_STEPS_TOTAL = "nonfinite_skipped_steps_total"  # train.on_nonfinite: skip
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
EVAL_MACRO_F1 = "eval_macro_f1"
WALL_SECONDS = "wall_seconds"
COMM_BYTES_TOTAL = "comm_bytes_total"
COMM_SECONDS_TOTAL = "comm_seconds_total"
COMM_INTER_NODE_BYTES_TOTAL = "comm_inter_node_bytes_total"
COMM_WIRE_BYTES_TOTAL = "comm_wire_bytes_total"  # bytes this rank sent over TCP, as the kernel counts them

# Serving (`ds serve`): histograms in seconds, counters by HTTP status.
SERVE_REQUEST_SECONDS = "serve_request_duration_seconds"  # histogram: arrival to response
SERVE_QUEUE_WAIT_SECONDS = "serve_queue_wait_seconds"  # histogram: arrival to batch start
SERVE_INFERENCE_SECONDS = "serve_inference_seconds"  # histogram: one batch's forward pass
SERVE_BATCH_SIZE = "serve_batch_size"  # histogram: requests per batch
SERVE_REQUESTS_TOTAL = "serve_requests_total"  # counter, label "status"
SERVE_IN_FLIGHT = "serve_in_flight_requests"  # gauge: accepted and not yet answered
SERVE_QUEUE_DEPTH = "serve_queue_depth"  # gauge: waiting for a batch

# Training endpoint only (the monitor's exporter): how long save() held the training loop.
CHECKPOINT_BLOCKED_SECONDS = "train_checkpoint_blocked_seconds"  # histogram: one observation per save
