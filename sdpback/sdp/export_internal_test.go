package sdp

// SetTrace installs f as s's connection set-up phase hook. Tests only, and
// before s dials or listens: f is called from the dialling goroutine and
// the listeners' goroutines, so it must be safe for concurrent use.
func SetTrace(s *Stack, f func(phase string)) { s.trace = f }
