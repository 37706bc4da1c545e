package vsock_test

import (
	"encoding/binary"
	"testing"

	"github.com/vsdp/vsdp/vhost/vsock"
)

// FuzzTxPackets feeds a sequence of guest packets into a device with an
// echo backend. Each record is op(1) srcPort(1) dstPort(1) flags(1)
// len(2) then len payload bytes (truncated at the input's end); the device
// must never panic, never exceed its stream bound, and answer only with
// well-formed packets to the guest's CID.
func FuzzTxPackets(f *testing.F) {
	f.Add([]byte{1, 1, 7, 0, 0, 0, 5, 1, 7, 0, 5, 0, 'h', 'e', 'l', 'l', 'o', 4, 1, 7, 3, 0, 0})
	f.Add([]byte{1, 1, 7, 0, 0, 0, 5, 1, 7, 0, 0xff, 0xff})
	f.Add([]byte{1, 2, 8, 0, 0, 0, 7, 2, 8, 0, 0, 0, 3, 1, 7, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		g := newGuest(t, vsock.Config{MaxConns: 8, BufAlloc: 4096}, &echo{}, false)
		g.postRx(64)
		for len(in) >= 6 {
			h := g.hdr(vsock.Op(in[0]%9), uint32(in[1]%4), uint32(in[2]%4)+6)
			h.Flags = uint32(in[3])
			n := int(binary.LittleEndian.Uint16(in[4:]))
			in = in[6:]
			p := in[:min(n, len(in))]
			in = in[len(p):]
			if in0 := len(p); in0 > 0 && p[0]&0x80 != 0 {
				h.Type = vsock.TypeSeqpacket
			}
			if n > len(p) {
				// A header claiming more payload than its buffer holds.
				hb := hdrBytes(h)
				binary.LittleEndian.PutUint32(hb[24:], uint32(n))
				out := [][]byte{hb}
				if len(p) > 0 {
					out = append(out, p)
				}
				if _, err := g.txr.Add(out, nil); err != nil {
					break
				}
				g.dev.Kick(vsock.TxQueue)
			} else {
				g.send(h, p)
			}
			for _, pk := range g.recv() {
				if pk.DstCID != guestCID || pk.SrcCID != vsock.HostCID {
					t.Fatalf("packet to the wrong address: %v", pk.Header)
				}
			}
			g.postRx(64)
			if g.dev.Conns() > 8 {
				t.Fatalf("%d streams beyond the bound", g.dev.Conns())
			}
		}
	})
}
