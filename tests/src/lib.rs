//! End-to-end tests: they start Tandem's real binaries (rollout server,
//! learners, launcher) on free loopback ports, talk to them over HTTP and gRPC,
//! and stop them by PID. Helpers for that live here; the tests come with the
//! rollout-server, learner and launcher issues.
