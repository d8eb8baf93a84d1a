"""The tasks: one module per entry script in launch/, named after it, each with run(cfg). A task imports the layers
below (config, runtime, model, data), never another task."""
