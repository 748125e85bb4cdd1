"""Heterogeneous clients on a simulated clock (issue 24, in progress on this branch):
``devices`` holds each client's device and how long a round takes on it. Not yet in
EXTENSIONS: the simulated clock, over-selection and FedBuff come next."""
