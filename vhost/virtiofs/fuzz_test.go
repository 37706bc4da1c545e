package virtiofs_test

import (
	"encoding/binary"
	"io"
	"log"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/vsdp/vsdp/vhost/virtiofs"
	"github.com/vsdp/vsdp/vhost/virtiofs/virtiofstest"
	"github.com/vsdp/vsdp/vmtest"
)

// TestMain silences the process-wide logger (go-fuse's fs bridge reports
// node ids and file handles it never issued there with log.Panicf, which
// go-fuse recovers as EIO, and the hostile tests send plenty) and makes
// sure no QEMU outlives the VM test.
func TestMain(m *testing.M) {
	log.SetOutput(io.Discard)
	vmtest.Main(m)
}

// initRequest is FUSE_INIT as Linux 6.1 sends it.
func initRequest() []byte {
	return sized(virtiofs.OpInit, 2, 0, le32s(7, 36, 128<<10, fuse.CAP_ASYNC_READ|fuse.CAP_BIG_WRITES|fuse.CAP_MAX_PAGES),
		make([]byte, 48))
}

// splitEvery cuts b into pieces of n bytes (n ≤ 0: one piece).
func splitEvery(b []byte, n int) [][]byte {
	if n <= 0 || len(b) == 0 {
		return [][]byte{b}
	}
	return virtiofstestSplit(b, n)
}

// FuzzRequest feeds one request (after a valid FUSE_INIT) through the
// device's request handler, split over descriptors, with a reply area of
// wlen bytes: it must never panic or hang, never claim more than the
// room it had, and any reply it writes must be a well-formed header.
func FuzzRequest(f *testing.F) {
	readIn := func(size uint32) []byte {
		return append(make([]byte, 16), le32s(size, 0, 0, 0, 0, 0)...)
	}
	writeIn := func(size uint32) []byte {
		return append(append(make([]byte, 16), le32s(size, 0)...), make([]byte, 16)...)
	}
	f.Add(initRequest(), uint16(0), uint16(128), false)
	f.Add(sized(virtiofs.OpLookup, 4, fuse.FUSE_ROOT_ID, []byte("hello\x00")), uint16(3), uint16(144), false)
	f.Add(sized(virtiofs.OpGetAttr, 6, fuse.FUSE_ROOT_ID, make([]byte, 16)), uint16(0), uint16(120), false)
	f.Add(sized(virtiofs.OpOpenDir, 8, fuse.FUSE_ROOT_ID, make([]byte, 8)), uint16(0), uint16(32), false)
	f.Add(sized(virtiofs.OpReadDir, 10, fuse.FUSE_ROOT_ID, readIn(4096)), uint16(0), uint16(4112), false)
	f.Add(sized(virtiofs.OpRead, 12, 2, readIn(100)), uint16(7), uint16(116), false)
	f.Add(sized(virtiofs.OpWrite, 14, 2, writeIn(5), []byte("abcde")), uint16(41), uint16(24), false)
	f.Add(sized(virtiofs.OpForget, 16, 2, make([]byte, 8)), uint16(0), uint16(0), true)
	f.Add(sized(virtiofs.OpBatchForget, 18, 0, le32s(2, 0), make([]byte, 32)), uint16(0), uint16(0), true)
	f.Add(sized(virtiofs.OpInterrupt, 20, 0, make([]byte, 8)), uint16(0), uint16(16), true)
	f.Add(raw(99, virtiofs.OpGetAttr, 22, 1), uint16(0), uint16(64), false)
	f.Add([]byte("short"), uint16(0), uint16(64), false)
	f.Fuzz(func(t *testing.T, data []byte, seg uint16, wlen uint16, hiprio bool) {
		d, err := virtiofs.New(virtiofstest.NewMemFS(map[string][]byte{"hello": []byte(hello)}, nil).RawFS(),
			virtiofs.Options{Mount: &fuse.MountOptions{MaxWrite: 64 << 10}})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		room := make([]byte, 256)
		if n := d.HandleForTest([][]byte{initRequest()}, [][]byte{room}, false); n < virtiofs.OutHeaderSize ||
			binary.LittleEndian.Uint32(room[4:]) != 0 {
			t.Fatalf("INIT failed: %d bytes, %x", n, room[:16])
		}
		out := make([]byte, wlen)
		n := d.HandleForTest(splitEvery(data, int(seg%4096)), splitEvery(out, int(seg%509)), hiprio)
		switch {
		case n < 0 || n > len(out):
			t.Fatalf("used length %d with %d bytes of room", n, len(out))
		case n > 0 && n < virtiofs.OutHeaderSize:
			t.Fatalf("used length %d: less than a reply header", n)
		case n >= virtiofs.OutHeaderSize:
			length, status := binary.LittleEndian.Uint32(out), int32(binary.LittleEndian.Uint32(out[4:]))
			if int(length) != n || status > 0 || status < -4095 {
				t.Fatalf("reply header length %d status %d, used length %d", length, status, n)
			}
			if status < 0 && length != virtiofs.OutHeaderSize {
				t.Fatalf("error reply of %d bytes", length)
			}
		}
	})
}
