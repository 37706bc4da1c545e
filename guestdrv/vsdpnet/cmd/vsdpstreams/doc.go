// Command vsdpstreams is the Go guest program of the VM tests: it runs the
// stream-check protocol (package streamcheck) through guestdrv/vsdpnet, so
// a static Go binary's Dial and Listen are tested end to end, the way
// guestdrv/testdata/vsdpstreams.c tests libvsdp.so.
//
//	vsdpstreams dial ADDR:PORT SEED N BUDGET
//	vsdpstreams serve PORT SEED N BUDGET RELEASEFILE
//
// dial opens N streams at once and checks what comes back; serve accepts
// N streams, checks each against the plan, and keeps them open until
// RELEASEFILE exists. Both print one report line per stream and a summary
// line, or "FAIL: ..." and exit status 1. The whole run is bounded (two
// minutes). Build it static (CGO_ENABLED=0), as the images package does.
package main
