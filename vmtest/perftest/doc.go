// Package perftest runs perftest's native-verbs tools (ib_send_bw,
// ib_write_bw, ib_read_bw, ib_send_lat) between the two guests of a
// vmtest.Fabric and reads their result rows: the baseline the VM-tier
// benchmark tables put beside vsdp's own figures.
//
// # Design
//
// Run starts the tool's server in guest 1 and its client in guest 0 (the
// client gets guest 1's address as its last argument), then parses the
// client's standard output. perftest's server needs a moment to listen and
// its client retries the TCP connection only briefly, so a client that
// reports "Couldn't connect" is run again, up to 20 times 300 ms apart. Its
// clock calibration fails now and then under TCG and it then reports 0: a
// 0 result is measured once more, and a second 0 is an error. Field, BW
// and Lat read a result row: the row whose first field is the message size
// and whose second is an iteration count.
//
// # Threat model
//
// The tools' output comes from the guests under test and is only parsed
// into numbers; a missing or malformed row is an error, never a panic.
//
// # Concurrency
//
// Run drives the fabric's guests: one Run at a time per fabric (perftest
// uses fixed ports; callers pass a distinct -p per run). Field, BW and Lat
// are pure.
package perftest
