"""The broker process (installed as zeroserve.broker): routes requests to workers."""
