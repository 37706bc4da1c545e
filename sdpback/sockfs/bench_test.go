package sockfs_test

import (
	"context"
	"io"
	"net/netip"
	"syscall"
	"testing"

	"github.com/vsdp/vsdp/sdpback"
	"github.com/vsdp/vsdp/sdpback/sdp"
	"github.com/vsdp/vsdp/sdpback/sockfs"
)

// fuseMax is the largest FUSE read or write (go-fuse's default MaxWrite).
const fuseMax = 128 << 10

// BenchmarkSockfsData moves size bytes per iteration through tcp/N/data
// (sockfs: the RawFileSystem called as the FUSE transport would, in
// requests of at most 128 KiB) beside the same bytes over the VM stack's
// sdp.Conn (baseline-sdp-conn), on the soft provider. "write": guest to
// a peer that discards; "read": a peer that writes without pause to the
// guest.
func BenchmarkSockfsData(b *testing.B) {
	for _, sz := range []struct {
		name string
		n    int
	}{{"4KiB", 4 << 10}, {"64KiB", 64 << 10}, {"1MiB", 1 << 20}} {
		for _, dir := range []string{"write", "read"} {
			name := sz.name + "-" + dir
			b.Run(name+"/sockfs", func(b *testing.B) { benchData(b, sz.n, dir == "write", true) })
			b.Run(name+"/baseline-sdp-conn", func(b *testing.B) { benchData(b, sz.n, dir == "write", false) })
		}
	}
}

func benchData(b *testing.B, size int, write, viaFS bool) {
	w := newWorld(b, sdpback.Policy{rule(b, "sdp 10.9.0.0/24")}, sockfs.Options{})
	served := make(chan int64, 1)
	stop := make(chan struct{})
	dialServe(b, w.peerSt, 9, func(c *sdp.Conn) {
		if write {
			n, _ := io.Copy(io.Discard, c)
			c.Close()
			served <- n
			return
		}
		buf := make([]byte, fuseMax)
		for {
			select {
			case <-stop:
				c.Close()
				return
			default:
			}
			if _, err := c.Write(buf); err != nil {
				c.Close()
				return
			}
		}
	})
	var rw io.ReadWriter
	var finish func()
	if viaFS {
		g := w.as(1000)
		ctl, n := g.dial("10.9.0.20!9")
		data := g.mustOpen("tcp/"+n+"/data", syscall.O_RDWR)
		rw = fileRW{data}
		finish = func() { ctl.write("shutdown"); data.release(); ctl.release() }
	} else {
		c, err := w.vmSt.Dial(context.Background(), netip.AddrPortFrom(peerAddr, 9))
		if err != nil {
			b.Fatal(err)
		}
		rw = c
		finish = func() { c.CloseWrite(); c.Close() }
	}
	buf := make([]byte, fuseMax)
	b.SetBytes(int64(size))
	b.ResetTimer()
	for range b.N {
		for left := size; left > 0; {
			k := min(left, fuseMax)
			var err error
			if write {
				k, err = rw.Write(buf[:k])
			} else {
				k, err = rw.Read(buf[:k])
			}
			if err != nil {
				b.Fatal(err)
			}
			left -= k
		}
	}
	b.StopTimer()
	close(stop)
	finish()
	if write {
		if n := <-served; n != int64(b.N)*int64(size) {
			b.Fatalf("peer received %d of %d bytes", n, int64(b.N)*int64(size))
		}
	}
}

// fileRW reads and writes an open data file.
type fileRW struct{ f *file }

func (r fileRW) Read(p []byte) (int, error) {
	b, errno := r.f.readInto(p)
	if errno != 0 {
		return 0, errno
	}
	if len(b) == 0 {
		return 0, io.EOF
	}
	if &b[0] != &p[0] {
		return copy(p, b), nil
	}
	return len(b), nil
}

func (r fileRW) Write(p []byte) (int, error) {
	n, errno := r.f.writev(p)
	if errno != 0 {
		return n, errno
	}
	return n, nil
}
