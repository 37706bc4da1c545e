package soft

import (
	"bytes"
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

func TestSmoke(t *testing.T) {
	for _, tr := range []string{"inproc", "tcp"} {
		t.Run(tr, func(t *testing.T) {
			net := NewNetwork()
			tab := NewTable()
			a1, a2 := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
			o1 := Options{Name: "d1", Addrs: []netip.Addr{a1}, Table: tab, Network: net}
			o2 := Options{Name: "d2", Addrs: []netip.Addr{a2}, Table: tab, Network: net}
			if tr == "tcp" {
				o1.Network, o2.Network = nil, nil
				o1.Listen = Endpoint{"tcp", "127.0.0.1:0"}
				o2.Listen = Endpoint{"tcp", "127.0.0.1:0"}
			}
			d1, err := Open(o1)
			if err != nil {
				t.Fatal(err)
			}
			d2, err := Open(o2)
			if err != nil {
				t.Fatal(err)
			}
			tab.Set(a1, d1.Endpoint())
			tab.Set(a2, d2.Endpoint())
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			ln, err := d2.Listen(verbs.ListenOptions{ServiceID: verbs.SDPServiceID(5000)})
			if err != nil {
				t.Fatal(err)
			}
			pd2, _ := d2.AllocPD()
			cq2, _ := d2.CreateCQ(verbs.CQOptions{})
			buf2, _ := verbs.AllocDMA(4096)
			mr2, err := pd2.RegMR(buf2.Bytes(), verbs.AccessLocalWrite)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			var pc verbs.Conn
			go func() {
				c, err := ln.Accept(ctx)
				if err != nil {
					done <- err
					return
				}
				pc = c
				if string(c.PrivateData()) != "hello" {
					t.Errorf("req priv %q", c.PrivateData())
				}
				done <- verbs.AcceptConn(ctx, c, verbs.AcceptConfig{PD: pd2, QP: verbs.QPOptions{SendCQ: cq2, RecvCQ: cq2},
					Param: verbs.ConnParam{PrivateData: []byte("ack")},
					Prepare: func(qp verbs.QP) error {
						return qp.PostRecv([]verbs.RecvWR{{ID: 7, SGL: []verbs.SGE{{Addr: mr2.Addr(), Length: 4096, LKey: mr2.LKey()}}}})
					}})
			}()
			pd1, _ := d1.AllocPD()
			cq1, _ := d1.CreateCQ(verbs.CQOptions{})
			buf1, _ := verbs.AllocDMA(4096)
			mr1, _ := pd1.RegMR(buf1.Bytes(), verbs.AccessLocalWrite)
			copy(buf1.Bytes(), "payload-data")
			c1, rep, err := verbs.Dial(ctx, d1, verbs.DialConfig{Resolve: verbs.ResolveOptions{Addr: a2, ServiceID: verbs.SDPServiceID(5000)},
				PD: pd1, QP: verbs.QPOptions{SendCQ: cq1, RecvCQ: cq1}, Param: verbs.ConnParam{PrivateData: []byte("hello")}})
			if err != nil {
				t.Fatal(err)
			}
			if string(rep) != "ack" {
				t.Errorf("rep %q", rep)
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			qp1 := c1.QP()
			if err := qp1.PostSend([]verbs.SendWR{{ID: 1, Op: verbs.OpSend, Flags: verbs.SendSignaled, SGL: []verbs.SGE{{Addr: mr1.Addr(), Length: 12, LKey: mr1.LKey()}}}}); err != nil {
				t.Fatal(err)
			}
			wc := make([]verbs.Completion, 4)
			n, err := verbs.PollWait(ctx, cq1, wc)
			if err != nil || n != 1 || wc[0].Status != verbs.StatusSuccess {
				t.Fatalf("send completion %d %v %+v", n, err, wc[0])
			}
			n, err = verbs.PollWait(ctx, cq2, wc)
			if err != nil || n != 1 || wc[0].Status != verbs.StatusSuccess || wc[0].ByteLen != 12 || wc[0].ID != 7 {
				t.Fatalf("recv completion %d %v %+v", n, err, wc[0])
			}
			if !bytes.Equal(buf2.Bytes()[:12], []byte("payload-data")) {
				t.Fatalf("got %q", buf2.Bytes()[:12])
			}
			c1.Disconnect()
			ev := <-pc.Events()
			for ev.Type == verbs.EventEstablished {
				ev = <-pc.Events()
			}
			if ev.Type != verbs.EventDisconnected {
				t.Fatalf("event %v", ev)
			}
			qp1.Close()
			pc.QP().Close()
			for _, err := range []error{c1.Close(), pc.Close(), ln.Close(), mr1.Close(), mr2.Close(), pd1.Close(), pd2.Close(), cq1.Close(), cq2.Close(), d1.Close(), d2.Close()} {
				if err != nil {
					t.Error(err)
				}
			}
			buf1.Close()
			buf2.Close()
		})
	}
}
