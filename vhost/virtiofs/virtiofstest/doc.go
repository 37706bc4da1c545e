// Package virtiofstest is a FUSE client over the fake vhost-user front-end
// (vhost/vhosttest), for tests of virtio-fs back-ends: it posts requests
// the way the Linux virtiofs driver does (hiprio ring 0 for FORGET, request
// ring 1 for everything else; header and arguments in one descriptor,
// payloads optionally split over many small ones) and returns replies as
// go-fuse's structs or syscall.Errno errors.
//
// It is trusted test code: it panics on its own misuse, and reports what
// the device does wrong (a reply whose length or unique does not match) as
// ErrBadReply. Calls may run concurrently: a request parked in the
// filesystem does not block the others. One goroutine reaps used rings
// until Close.
package virtiofstest
