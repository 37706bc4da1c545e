package soft

import (
	"errors"
	"testing"

	"github.com/vsdp/vsdp/verbs"
)

const testMaxMsg = 1 << 20

func enc(h header) []byte {
	b := make([]byte, headerLen)
	h.put(b)
	return b
}

// TestDecodeHeader has one row per validation rule of decodeHeader.
func TestDecodeHeader(t *testing.T) {
	okRows := []struct {
		name string
		h    header
	}{
		{"REQ", header{typ: frameREQ, length: 92, addr: 0x11388, imm: 1, rkey: 2, psn: 7, dmaLen: 16}},
		{"REP", header{typ: frameREP, length: 196, psn: 9, dmaLen: maxQueueDepth}},
		{"REJ", header{typ: frameREJ, length: 148, imm: 28}},
		{"RTU", header{typ: frameRTU}},
		{"DREQ", header{typ: frameDREQ}},
		{"DREP", header{typ: frameDREP}},
		{"SEND", header{typ: frameSend, length: testMaxMsg, psn: 1}},
		{"SEND imm solicited", header{typ: frameSend, flags: flagImm | flagSolicited, imm: 5}},
		{"SEND inv", header{typ: frameSend, flags: flagInv, imm: 0x1200}},
		{"WRITE", header{typ: frameWrite, length: 10, addr: 1 << 40, rkey: 0x300}},
		{"WRITE zero length, no key", header{typ: frameWrite}},
		{"WRITE imm", header{typ: frameWrite, flags: flagImm | flagSolicited, imm: 3, length: 1, addr: 1, rkey: 1}},
		{"READ", header{typ: frameReadReq, addr: 1, rkey: 2, dmaLen: testMaxMsg, psn: 3}},
		{"ACK", header{typ: frameAck, psn: 0xffffffff}},
		{"NAK RNR", header{typ: frameNak, code: nakRNR, dmaLen: maxRNRTimerMicros}},
		{"NAK access", header{typ: frameNak, code: nakAccess, psn: 4}},
		{"READ response", header{typ: frameReadResp, length: testMaxMsg, psn: 2}},
	}
	for _, r := range okRows {
		t.Run("ok/"+r.name, func(t *testing.T) {
			got, err := decodeHeader(enc(r.h), testMaxMsg)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if got != r.h {
				t.Fatalf("round trip: got %+v, want %+v", got, r.h)
			}
		})
	}
	badRows := []struct {
		name string
		b    []byte
	}{
		{"short header", make([]byte, headerLen-1)},
		{"version 0", func() []byte { b := enc(header{typ: frameAck}); b[0] = 0; return b }()},
		{"version 2", func() []byte { b := enc(header{typ: frameAck}); b[0] = 2; return b }()},
		{"unknown type", enc(header{typ: 99})},
		{"type 0", enc(header{})},
		{"REQ private data 93", enc(header{typ: frameREQ, length: 93, dmaLen: 1})},
		{"REQ depth 0", enc(header{typ: frameREQ})},
		{"REQ depth too large", enc(header{typ: frameREQ, dmaLen: maxQueueDepth + 1})},
		{"REQ flags", enc(header{typ: frameREQ, dmaLen: 1, flags: 1})},
		{"REP private data 197", enc(header{typ: frameREP, length: 197, dmaLen: 1})},
		{"REP depth 0", enc(header{typ: frameREP})},
		{"REP addr set", enc(header{typ: frameREP, dmaLen: 1, addr: 1})},
		{"REJ private data 149", enc(header{typ: frameREJ, length: 149})},
		{"REJ reason above 16 bits", enc(header{typ: frameREJ, imm: 1 << 16})},
		{"REJ psn set", enc(header{typ: frameREJ, psn: 1})},
		{"RTU with payload", enc(header{typ: frameRTU, length: 1})},
		{"DREQ with psn", enc(header{typ: frameDREQ, psn: 1})},
		{"DREP with code", enc(header{typ: frameDREP, code: 1})},
		{"SEND too long", enc(header{typ: frameSend, length: testMaxMsg + 1})},
		{"SEND imm and inv", enc(header{typ: frameSend, flags: flagImm | flagInv})},
		{"SEND unknown flag", enc(header{typ: frameSend, flags: 1 << 5})},
		{"SEND imm without flag", enc(header{typ: frameSend, imm: 1})},
		{"SEND with rkey", enc(header{typ: frameSend, rkey: 1})},
		{"SEND with code", enc(header{typ: frameSend, code: 1})},
		{"WRITE too long", enc(header{typ: frameWrite, length: testMaxMsg + 1})},
		{"WRITE inv flag", enc(header{typ: frameWrite, flags: flagInv})},
		{"WRITE dma length set", enc(header{typ: frameWrite, dmaLen: 1})},
		{"READ too long", enc(header{typ: frameReadReq, dmaLen: testMaxMsg + 1})},
		{"READ with payload", enc(header{typ: frameReadReq, length: 1})},
		{"READ with flags", enc(header{typ: frameReadReq, flags: flagSolicited})},
		{"ACK with payload", enc(header{typ: frameAck, length: 1})},
		{"ACK with rkey", enc(header{typ: frameAck, rkey: 1})},
		{"NAK syndrome 0", enc(header{typ: frameNak})},
		{"NAK syndrome 9", enc(header{typ: frameNak, code: 9})},
		{"NAK RNR timer too long", enc(header{typ: frameNak, code: nakRNR, dmaLen: maxRNRTimerMicros + 1})},
		{"NAK access with timer", enc(header{typ: frameNak, code: nakAccess, dmaLen: 1})},
		{"NAK with payload", enc(header{typ: frameNak, code: nakAccess, length: 1})},
		{"READ response too long", enc(header{typ: frameReadResp, length: testMaxMsg + 1})},
		{"READ response with addr", enc(header{typ: frameReadResp, addr: 1})},
	}
	for _, r := range badRows {
		t.Run("bad/"+r.name, func(t *testing.T) {
			_, err := decodeHeader(r.b, testMaxMsg)
			var fe *FrameError
			if !errors.As(err, &fe) || !errors.Is(err, verbs.ErrProtocol) {
				t.Fatalf("got %v, want a FrameError wrapping ErrProtocol", err)
			}
		})
	}
}

// FuzzFrame decodes arbitrary headers: never a panic, and whatever decodes
// re-encodes to the same bytes and decodes to the same header.
func FuzzFrame(f *testing.F) {
	for _, h := range []header{
		{typ: frameREQ, length: 5, addr: 0x11388, imm: 0x0a000001, rkey: 0x0a000002, psn: 0x101, dmaLen: 128},
		{typ: frameSend, flags: flagImm, length: 4096, psn: 7, imm: 9},
		{typ: frameWrite, length: 64, addr: 0x7f0000001000, rkey: 0x1234},
		{typ: frameReadReq, addr: 0x7f0000001000, rkey: 0x1234, dmaLen: 65536},
		{typ: frameNak, code: nakRNR, psn: 3, dmaLen: 1000},
		{typ: frameReadResp, length: 100, psn: 4},
	} {
		f.Add(enc(h), uint32(testMaxMsg))
	}
	f.Add([]byte("not a frame at all, not at all.."), uint32(1))
	f.Fuzz(func(t *testing.T, b []byte, maxMsg uint32) {
		h, err := decodeHeader(b, uint64(maxMsg))
		if err != nil {
			return
		}
		again := enc(h)
		h2, err := decodeHeader(again, uint64(maxMsg))
		if err != nil || h2 != h {
			t.Fatalf("re-decode: %+v %v, want %+v", h2, err, h)
		}
		if string(again) != string(b) {
			t.Fatalf("re-encode differs: %x vs %x", again, b)
		}
		if h.typ.isRequest() && h.typ != frameReadReq && uint64(h.length) > uint64(maxMsg) {
			t.Fatalf("accepted length %d above %d", h.length, maxMsg)
		}
	})
}
