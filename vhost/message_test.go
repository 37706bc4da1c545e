package vhost

import (
	"bytes"
	"errors"
	"testing"

	"github.com/vsdp/vsdp/vhost/guestmem"
)

func TestRequestString(t *testing.T) {
	for r := Request(1); r <= maxRequest; r++ {
		if requestNames[r] == "" {
			t.Errorf("request %d has no name", r)
		}
	}
	if got := ReqGetVringBase.String(); got != "GET_VRING_BASE" {
		t.Errorf("got %q", got)
	}
	if got := Request(99).String(); got != "REQUEST_99" {
		t.Errorf("got %q", got)
	}
}

func TestHeaderRoundTrip(t *testing.T) {
	h := Header{Request: ReqSetVringAddr, Flags: FlagVersion | FlagNeedReply, Size: 40}
	b := h.Append(nil)
	if len(b) != HeaderSize {
		t.Fatalf("header of %d bytes", len(b))
	}
	got, err := ParseHeader(b)
	if err != nil || got != h {
		t.Fatalf("got %+v, %v", got, err)
	}
	if _, err := ParseHeader(b[:11]); !errors.Is(err, ErrProtocol) {
		t.Fatalf("short header: %v", err)
	}
}

// Every payload shape encodes to the exact wire size and decodes back.
func TestPayloadRoundTrip(t *testing.T) {
	region := guestmem.RegionSpec{GPA: 0x1000, Size: 0x20000, UVA: 0x7f0000001000, MmapOffset: 0x3000}
	cases := []struct {
		req  Request
		p    Payload
		size int
	}{
		{ReqGetFeatures, Empty{}, 0},
		{ReqSetFeatures, U64(FeatureVersion1 | FeatureEventIdx), 8},
		{ReqSetVringKick, U64(1 | VringNoFD), 8},
		{ReqSetVringNum, VringState{Index: 1, Num: 256}, 8},
		{ReqGetVringBase, VringState{Index: 1, Num: 0}, 8},
		{ReqSetVringAddr, VringAddr{Index: 1, Desc: 0x10, Used: 0x20, Avail: 0x30, Log: 0x40}, 40},
		{ReqSetMemTable, MemTable{Regions: []guestmem.RegionSpec{region, region}}, 8 + 64},
		{ReqAddMemReg, MemRegion{Region: region}, 40},
		{ReqRemMemReg, MemRegion{Region: region}, 40},
		{ReqGetConfig, Config{Offset: 4, Flags: ConfigMigration, Data: []byte{1, 2, 3}}, 15},
	}
	for _, c := range cases {
		b := c.p.Append(nil)
		if len(b) != c.size {
			t.Errorf("%s: %d bytes, want %d", c.req, len(b), c.size)
			continue
		}
		got, err := Decode(c.req, b)
		if err != nil {
			t.Errorf("%s: decode: %v", c.req, err)
			continue
		}
		if !bytes.Equal(got.Append(nil), b) {
			t.Errorf("%s: round trip %+v != %+v", c.req, got, c.p)
		}
	}
}

// The validation table: one row per rule, each expecting its sentinel.
func TestValidate(t *testing.T) {
	neg := func() *negotiation {
		return &negotiation{
			features:      FeatureVersion1 | FeatureProtocolFeatures | FeatureEventIdx,
			protocol:      ProtocolMQ | ProtocolReplyAck | ProtocolConfig | ProtocolConfigureMemSlots | ProtocolResetDevice,
			acked:         FeatureVersion1 | FeatureProtocolFeatures,
			ackedProtocol: ProtocolMQ | ProtocolReplyAck | ProtocolConfig | ProtocolConfigureMemSlots | ProtocolResetDevice,
			queues:        2,
			maxQueueSize:  1024,
		}
	}
	u64 := func(v uint64) []byte { return U64(v).Append(nil) }
	vs := func(i, n uint32) []byte { return VringState{Index: i, Num: n}.Append(nil) }
	addr := func(i uint32, desc, avail, used uint64, flags uint32) []byte {
		return VringAddr{Index: i, Flags: flags, Desc: guestmem.UVA(desc), Avail: guestmem.UVA(avail), Used: guestmem.UVA(used)}.Append(nil)
	}
	region := guestmem.RegionSpec{GPA: 0, Size: 4096, UVA: 0x1000}
	table := func(n int) []byte {
		t := MemTable{}
		for range n {
			t.Regions = append(t.Regions, region)
		}
		return t.Append(nil)
	}
	cfg := func(off, size, flags uint32) []byte {
		return Config{Offset: off, Flags: flags, Data: make([]byte, size)}.Append(nil)
	}
	const v1 = FlagVersion
	cases := []struct {
		name  string
		req   Request
		flags uint32
		p     []byte
		fds   int
		neg   func(*negotiation)
		want  error // nil: valid
	}{
		{"get features", ReqGetFeatures, v1, nil, 0, nil, nil},
		{"need reply flag", ReqSetOwner, v1 | FlagNeedReply, nil, 0, nil, nil},
		{"version 0", ReqGetFeatures, 0, nil, 0, nil, ErrProtocol},
		{"version 2", ReqGetFeatures, 2, nil, 0, nil, ErrProtocol},
		{"reply flag from front-end", ReqGetFeatures, v1 | FlagReply, nil, 0, nil, ErrProtocol},
		{"unknown flag bits", ReqGetFeatures, v1 | 0x100, nil, 0, nil, ErrProtocol},
		{"too many fds", ReqSetMemTable, v1, table(1), MaxFDs + 1, nil, ErrProtocol},
		{"request 0", 0, v1, nil, 0, nil, ErrUnsupported},
		{"unknown request", 200, v1, nil, 0, nil, ErrUnsupported},
		{"not implemented", ReqSetLogFD, v1, nil, 1, nil, ErrUnsupported},
		{"gated off: log base", ReqSetLogBase, v1, make([]byte, 16), 1, nil, ErrUnsupported},
		{"gated off: inflight", ReqGetInflightFD, v1, make([]byte, 24), 0, nil, ErrUnsupported},
		{"gated off: status", ReqSetStatus, v1, u64(0xf), 0, nil, ErrUnsupported},
		{"config not acked", ReqGetConfig, v1, cfg(0, 8, 0), 0, func(n *negotiation) { n.ackedProtocol &^= ProtocolConfig }, ErrUnsupported},
		{"mem slots not acked", ReqAddMemReg, v1, MemRegion{Region: region}.Append(nil), 1, func(n *negotiation) { n.ackedProtocol = 0 }, ErrUnsupported},
		{"queue num without MQ", ReqGetQueueNum, v1, nil, 0, func(n *negotiation) { n.ackedProtocol = 0 }, ErrUnsupported},
		{"reset device not acked", ReqResetDevice, v1, nil, 0, func(n *negotiation) { n.ackedProtocol = 0 }, ErrUnsupported},
		{"enable without protocol features", ReqSetVringEnable, v1, vs(0, 1), 0, func(n *negotiation) { n.acked = FeatureVersion1 }, ErrUnsupported},
		{"get features with payload", ReqGetFeatures, v1, u64(0), 0, nil, ErrProtocol},
		{"set features short", ReqSetFeatures, v1, make([]byte, 4), 0, nil, ErrProtocol},
		{"set features long", ReqSetFeatures, v1, make([]byte, 16), 0, nil, ErrProtocol},
		{"vring num short", ReqSetVringNum, v1, make([]byte, 4), 0, nil, ErrProtocol},
		{"vring addr short", ReqSetVringAddr, v1, make([]byte, 32), 0, nil, ErrProtocol},
		{"mem table no regions", ReqSetMemTable, v1, table(0), 0, nil, ErrProtocol},
		{"mem table 9 regions", ReqSetMemTable, v1, append(ne.AppendUint32(nil, 9), make([]byte, 4+9*32)...), 9, nil, ErrProtocol},
		{"mem table size mismatch", ReqSetMemTable, v1, append(table(2), 0), 2, nil, ErrProtocol},
		{"mem table truncated", ReqSetMemTable, v1, table(2)[:40], 2, nil, ErrProtocol},
		{"config size 0", ReqGetConfig, v1, cfg(0, 0, 0), 0, nil, ErrProtocol},
		{"config size mismatch", ReqGetConfig, v1, append(cfg(0, 8, 0), 1), 0, nil, ErrProtocol},
		{"config too large", ReqGetConfig, v1, cfg(0, 257, 0), 0, nil, ErrProtocol},
		{"mem table fds missing", ReqSetMemTable, v1, table(2), 1, nil, ErrProtocol},
		{"mem table fds extra", ReqSetMemTable, v1, table(1), 2, nil, ErrProtocol},
		{"mem table ok", ReqSetMemTable, v1, table(2), 2, nil, nil},
		{"add region no fd", ReqAddMemReg, v1, MemRegion{Region: region}.Append(nil), 0, nil, ErrProtocol},
		{"add region two fds", ReqAddMemReg, v1, MemRegion{Region: region}.Append(nil), 2, nil, ErrProtocol},
		{"remove region with fd", ReqRemMemReg, v1, MemRegion{Region: region}.Append(nil), 1, nil, nil},
		{"remove region two fds", ReqRemMemReg, v1, MemRegion{Region: region}.Append(nil), 2, nil, ErrProtocol},
		{"get features with fd", ReqGetFeatures, v1, nil, 1, nil, ErrProtocol},
		{"kick without fd", ReqSetVringKick, v1, u64(0), 0, nil, ErrProtocol},
		{"kick nofd with fd", ReqSetVringKick, v1, u64(VringNoFD), 1, nil, ErrProtocol},
		{"call two fds", ReqSetVringCall, v1, u64(1), 2, nil, ErrProtocol},
		{"call ok", ReqSetVringCall, v1, u64(1), 1, nil, nil},
		{"call nofd", ReqSetVringCall, v1, u64(1 | VringNoFD), 0, nil, nil},
		{"kick index out of range", ReqSetVringKick, v1, u64(2), 1, nil, ErrInvalid},
		{"kick unknown bits", ReqSetVringErr, v1, u64(1 << 9), 1, nil, ErrInvalid},
		{"vring num ok", ReqSetVringNum, v1, vs(1, 1024), 0, nil, nil},
		{"vring num index", ReqSetVringNum, v1, vs(2, 128), 0, nil, ErrInvalid},
		{"vring num huge index", ReqSetVringNum, v1, vs(0xffffffff, 128), 0, nil, ErrInvalid},
		{"vring num zero", ReqSetVringNum, v1, vs(0, 0), 0, nil, ErrInvalid},
		{"vring num not power of two", ReqSetVringNum, v1, vs(0, 100), 0, nil, ErrInvalid},
		{"vring num above device max", ReqSetVringNum, v1, vs(0, 2048), 0, nil, ErrInvalid},
		{"vring num 65536", ReqSetVringNum, v1, vs(0, 65536), 0, nil, ErrInvalid},
		{"vring base ok", ReqSetVringBase, v1, vs(0, 0xffff), 0, nil, nil},
		{"vring base beyond u16", ReqSetVringBase, v1, vs(0, 0x10000), 0, nil, ErrInvalid},
		{"vring base index", ReqSetVringBase, v1, vs(3, 0), 0, nil, ErrInvalid},
		{"get vring base index", ReqGetVringBase, v1, vs(2, 0), 0, nil, ErrInvalid},
		{"enable 2", ReqSetVringEnable, v1, vs(0, 2), 0, nil, ErrInvalid},
		{"enable index", ReqSetVringEnable, v1, vs(9, 1), 0, nil, ErrInvalid},
		{"addr ok", ReqSetVringAddr, v1, addr(0, 0x1000, 0x2002, 0x3004, 0), 0, nil, nil},
		{"addr desc misaligned", ReqSetVringAddr, v1, addr(0, 0x1008, 0x2000, 0x3000, 0), 0, nil, ErrInvalid},
		{"addr avail misaligned", ReqSetVringAddr, v1, addr(0, 0x1000, 0x2001, 0x3000, 0), 0, nil, ErrInvalid},
		{"addr used misaligned", ReqSetVringAddr, v1, addr(0, 0x1000, 0x2000, 0x3002, 0), 0, nil, ErrInvalid},
		{"addr log flag", ReqSetVringAddr, v1, addr(0, 0x1000, 0x2000, 0x3000, 1), 0, nil, ErrInvalid},
		{"addr index", ReqSetVringAddr, v1, addr(2, 0x1000, 0x2000, 0x3000, 0), 0, nil, ErrInvalid},
		{"features offered", ReqSetFeatures, v1, u64(FeatureVersion1 | FeatureEventIdx), 0, nil, nil},
		{"features never offered", ReqSetFeatures, v1, u64(FeatureVersion1 | FeatureIndirectDesc), 0, nil, ErrInvalid},
		{"protocol never offered", ReqSetProtocolFeatures, v1, u64(ProtocolMQ | ProtocolLogShmfd), 0, nil, ErrInvalid},
		{"config flags", ReqSetConfig, v1, cfg(0, 8, 2), 0, nil, ErrInvalid},
		{"config beyond 256", ReqSetConfig, v1, cfg(250, 8, 0), 0, nil, ErrInvalid},
		{"config ok", ReqSetConfig, v1, cfg(248, 8, ConfigMigration), 0, nil, nil},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			n := neg()
			if c.neg != nil {
				c.neg(n)
			}
			h := Header{Request: c.req, Flags: c.flags, Size: uint32(len(c.p))}
			_, err := validate(h, c.p, c.fds, n)
			switch {
			case c.want == nil && err != nil:
				t.Fatalf("rejected: %v", err)
			case c.want != nil && !errors.Is(err, c.want):
				t.Fatalf("got %v, want %v", err, c.want)
			case err != nil:
				var me *MessageError
				if !errors.As(err, &me) || me.Request != c.req {
					t.Fatalf("error %v is not a *MessageError for %s", err, c.req)
				}
			}
		})
	}
	// A header whose size disagrees with the bytes at hand.
	if _, err := validate(Header{Request: ReqSetFeatures, Flags: v1, Size: 9}, u64(1), 0, neg()); !errors.Is(err, ErrProtocol) {
		t.Fatalf("size mismatch: %v", err)
	}
}

// Every row of the table that the core implements is reachable: a valid
// message exists for it (guards against a row that can never pass).
func TestRulesImplementedHaveHandlers(t *testing.T) {
	for r := Request(1); r <= maxRequest; r++ {
		if !rules[r].impl {
			continue
		}
		if _, err := Decode(r, nil); errors.Is(err, ErrUnsupported) {
			t.Errorf("%s is implemented but Decode does not know it", r)
		}
	}
}
