package sdp_test

import (
	"bytes"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/vsdp/vsdp/sdpback/sdp"
)

// FuzzStreamOps drives a connected pair with fuzzed buffer geometry, write
// sizes, read sizes, NODELAY and half-close order, both directions at once,
// and checks the invariants: every byte written arrives, once, in order;
// both sides end with EOF; no message is ever built without a credit.
//
// Input: byte 0 = receive buffers (4..11), byte 1 = receive size class,
// byte 2 = flags (bit 0: A nodelay, bit 1: B nodelay, bit 2: B closes
// first), then pairs (A write size, B write size) scaled by 37.
func FuzzStreamOps(f *testing.F) {
	f.Add([]byte{4, 0, 0, 1, 1, 200, 3, 255, 255})
	f.Add([]byte{11, 7, 7, 100, 0, 0, 100, 42, 42})
	f.Add([]byte{5, 2, 4, 255, 1, 1, 255})
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < 3 || len(in) > 200 {
			return
		}
		cfg := sdp.Config{RecvBufs: 4 + int(in[0]%8), RecvBufSize: 80 << (in[1] % 8), SendBufs: 1 + int(in[0]%3)}
		fl := in[2]
		var wa, wb []int
		for i := 3; i+1 < len(in); i += 2 {
			wa, wb = append(wa, int(in[i])*37), append(wb, int(in[i+1])*37)
		}
		fb := newFabric(t, "inproc", cfg)
		a, b := fb.pair(t, 7100)
		defer a.Close()
		defer b.Close()
		a.SetNoDelay(fl&1 != 0)
		b.SetNoDelay(fl&2 != 0)
		send := func(c *sdp.Conn, sizes []int, tag byte, delay bool) ([]byte, chan error) {
			var all []byte
			for i, n := range sizes {
				for j := 0; j < n; j++ {
					all = append(all, tag^byte(i)^byte(j*7))
				}
			}
			errc := make(chan error, 1)
			go func() {
				if delay {
					time.Sleep(time.Millisecond)
				}
				p := all
				for _, n := range sizes {
					if _, err := c.Write(p[:n]); err != nil {
						errc <- err
						return
					}
					p = p[n:]
				}
				errc <- c.CloseWrite()
			}()
			return all, errc
		}
		wantAB, ea := send(a, wa, 0xa0, fl&4 != 0)
		wantBA, eb := send(b, wb, 0x0b, false)
		recv := func(c *sdp.Conn) chan []byte {
			ch := make(chan []byte, 1)
			go func() {
				c.SetReadDeadline(time.Now().Add(20 * time.Second))
				got, err := io.ReadAll(c)
				if err != nil {
					got = append(got, []byte(fmt.Sprintf("<error %v>", err))...)
				}
				ch <- got
			}()
			return ch
		}
		ra, rb := recv(b), recv(a)
		gotAB, gotBA := <-ra, <-rb
		if err := <-ea; err != nil {
			t.Fatalf("A write: %v", err)
		}
		if err := <-eb; err != nil {
			t.Fatalf("B write: %v", err)
		}
		if !bytes.Equal(gotAB, wantAB) || !bytes.Equal(gotBA, wantBA) {
			for _, g := range [][]byte{gotAB, gotBA} {
				if i := bytes.Index(g, []byte("<error")); i >= 0 {
					t.Logf("reader: %s", g[i:])
				}
			}
			t.Fatalf("A->B %d of %d bytes intact=%v, B->A %d of %d intact=%v (cfg %+v)",
				len(gotAB), len(wantAB), bytes.Equal(gotAB, wantAB), len(gotBA), len(wantBA), bytes.Equal(gotBA, wantBA), cfg)
		}
		for _, c := range []*sdp.Conn{a, b} {
			if st := c.Stats(); st.Overdrafts != 0 {
				t.Fatalf("%d messages built without a credit: %+v", st.Overdrafts, st)
			}
		}
	})
}
