package vhost

import (
	"errors"
	"reflect"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
)

// FuzzDecodeMessage feeds arbitrary header+payload bytes, fd counts and
// negotiation states to validation and decoding. It must never panic; a
// rejection must be a *MessageError wrapping one sentinel; an accepted
// message must re-encode to the same size and decode to the same value.
func FuzzDecodeMessage(f *testing.F) {
	msg := func(req Request, flags uint32, p Payload) []byte {
		var b []byte
		if p != nil {
			b = p.Append(nil)
		}
		return append(Header{Request: req, Flags: flags, Size: uint32(len(b))}.Append(nil), b...)
	}
	all := ProtocolMQ | ProtocolReplyAck | ProtocolConfig | ProtocolConfigureMemSlots | ProtocolResetDevice
	acked := FeatureVersion1 | FeatureProtocolFeatures
	region := guestmem.RegionSpec{GPA: 0, Size: 1 << 20, UVA: 0x7f0000000000}
	f.Add(msg(ReqGetFeatures, FlagVersion, nil), uint8(0), acked, all)
	f.Add(msg(ReqSetFeatures, FlagVersion|FlagNeedReply, U64(acked)), uint8(0), acked, all)
	f.Add(msg(ReqSetMemTable, FlagVersion, MemTable{Regions: []guestmem.RegionSpec{region}}), uint8(1), acked, all)
	f.Add(msg(ReqAddMemReg, FlagVersion, MemRegion{Region: region}), uint8(1), acked, all)
	f.Add(msg(ReqSetVringAddr, FlagVersion, VringAddr{Index: 1, Desc: 0x1000, Avail: 0x2000, Used: 0x3000}), uint8(0), acked, all)
	f.Add(msg(ReqSetVringKick, FlagVersion, U64(1)), uint8(1), acked, all)
	f.Add(msg(ReqSetVringCall, FlagVersion, U64(VringNoFD)), uint8(0), acked, all)
	f.Add(msg(ReqSetVringEnable, FlagVersion, VringState{Index: 0, Num: 1}), uint8(0), acked, all)
	f.Add(msg(ReqGetConfig, FlagVersion, Config{Data: make([]byte, 8)}), uint8(0), acked, all)
	f.Add(msg(ReqSetVringNum, 5, VringState{Num: 3}), uint8(2), uint64(0), uint64(0))
	f.Add([]byte{1, 0, 0, 0}, uint8(0), uint64(0), uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, nfds uint8, acked, ackedProtocol uint64) {
		// Decoding alone, for any request, must be safe.
		if len(data) >= 4 {
			_, _ = Decode(Request(ne.Uint32(data)), data[4:])
		}
		h, err := ParseHeader(data)
		if err != nil {
			return
		}
		p := data[HeaderSize:]
		n := negotiation{
			features:      FeatureVersion1 | FeatureIndirectDesc | FeatureEventIdx | FeatureProtocolFeatures,
			protocol:      ProtocolMQ | ProtocolReplyAck | ProtocolConfig | ProtocolConfigureMemSlots | ProtocolResetDevice,
			acked:         acked,
			ackedProtocol: ackedProtocol,
			queues:        2,
			maxQueueSize:  1024,
		}
		pl, err := validate(h, p, int(nfds), &n)
		if err != nil {
			var me *MessageError
			if !errors.As(err, &me) || me.Request != h.Request {
				t.Fatalf("rejection %v is not a *MessageError for %s", err, h.Request)
			}
			k := 0
			for _, s := range []error{ErrProtocol, ErrUnsupported, ErrInvalid, ErrState} {
				if errors.Is(err, s) {
					k++
				}
			}
			if k != 1 {
				t.Fatalf("rejection %v wraps %d sentinels", err, k)
			}
			return
		}
		if !rules[h.Request].impl {
			t.Fatalf("accepted unimplemented %s", h.Request)
		}
		b := pl.Append(nil)
		if len(b) != len(p) {
			t.Fatalf("%s: re-encoded to %d bytes from %d", h.Request, len(b), len(p))
		}
		pl2, err := Decode(h.Request, b)
		if err != nil {
			t.Fatalf("%s: re-encoding does not decode: %v", h.Request, err)
		}
		if !reflect.DeepEqual(pl, pl2) {
			t.Fatalf("%s: %+v re-decoded as %+v", h.Request, pl, pl2)
		}
	})
}
