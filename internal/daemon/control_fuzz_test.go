package daemon

import (
	"encoding/json"
	"errors"
	"testing"
)

// FuzzControlRequest feeds arbitrary lines to the control socket's
// decoder and, for an add, to the validator against a running VM. It
// checks that neither panics, that every refusal is one of the package's
// errors, and that an accepted request survives a round trip.
func FuzzControlRequest(f *testing.F) {
	for _, s := range []string{
		`{"op":"list"}`,
		`{"op":"stats"}`,
		`{"op":"remove","name":"web1"}`,
		`{"op":"add","vm":{"name":"n","socket":"/run/vsdp/n.sock","cid":30,"addr":"10.77.0.30","policy":["sdp 10.77.0.0/16:*"]}}`,
		`{"op":"add","vm":{"name":"a","socket":"/run/vsdp/x.sock","cid":31,"addr":"10.77.0.31"}}`,
		`{"op":"add","vm":{"name":"n","socket":"/run/vsdp/a.sock","cid":3,"addr":"10.77.0.3","listen":"tcp:127.0.0.1:0"}}`,
		`{"op":"add","vm":{"name":"n","socket":"/s","fs_socket":"/s","cid":30,"addr":"::ffff:10.77.0.30"}}`,
		`{"op":"list"} {"op":"list"}`,
		`{"op":"reboot"}`,
		`{"op":"add","vm":null}`,
		`not json`,
		``,
	} {
		f.Add([]byte(s))
	}
	base := Config{Fabric: Fabric{Addr: "10.77.0.1", Peers: map[string]string{"10.77.1.1": "tcp:127.0.0.1:7470"}}}
	running := []VMConfig{{Name: "a", Socket: "/run/vsdp/a.sock", CID: 3, Addr: "10.77.0.3"}}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := parseRequest(line)
		if err != nil {
			if !errors.Is(err, ErrRequest) {
				t.Fatalf("refusal %v is not ErrRequest", err)
			}
			return
		}
		b, err := json.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		r2, err := parseRequest(b)
		if err != nil || r2.Op != r.Op || r2.Name != r.Name || (r2.VM == nil) != (r.VM == nil) {
			t.Fatalf("round trip of %s: %+v, %v", b, r2, err)
		}
		if r.Op == "add" {
			if err := checkAdd(base, running, *r.VM); err != nil && !errors.Is(err, ErrInvalid) {
				t.Fatalf("add refusal %v is not ErrInvalid", err)
			}
		}
	})
}
