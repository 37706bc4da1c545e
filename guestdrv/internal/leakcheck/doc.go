// Package leakcheck is the guest driver tests' check for leaked goroutines
// and file descriptors: Take records the process's goroutine count and its
// open descriptors by target (counted per target, so a descriptor number
// reused for the same kind of object is no leak); Snapshot.Check waits up
// to 5 s for both to come back down and fails the test with the new
// descriptors and every goroutine's stack if they do not.
//
// It is test-support code for guestdrv and its sub-packages; it trusts its
// caller and reads only /proc/self. Take and Check may run from any
// goroutine; a Snapshot is a value and is not changed after Take.
package leakcheck
