package vmtest

import "context"

// RunPair runs a two-guest exchange: it starts server in the fabric's
// second guest, runs client to its end in the first, then waits for the
// server. If the client cannot be run the server is stopped. The exit
// statuses are the caller's to judge (Result.Err); err reports only a
// failure to run either command.
func (f *Fabric) RunPair(ctx context.Context, server, client Cmd) (cr, sr *Result, err error) {
	srv, err := f.Guests[1].Start(ctx, server)
	if err != nil {
		return nil, nil, err
	}
	cr, err = f.Guests[0].Exec(ctx, client)
	if err != nil {
		srv.Stop(ctx) //nolint:errcheck // the client's error is the one to report
		return nil, nil, err
	}
	sr, err = srv.Wait(ctx)
	if err != nil {
		return nil, nil, err
	}
	return cr, sr, nil
}
