"""TorchServe outside handlers/: config rendering, process control, management API,
archiving, its protos, its metrics adapter and its commands."""
