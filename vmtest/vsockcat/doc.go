// Command vsockcat is a small static guest tool for vsock tests: it joins
// standard input and output to one AF_VSOCK stream.
//
//	vsockcat CID PORT     connect; copy stdin to the stream (then shut down
//	                      the sending side), the stream to stdout
//	vsockcat -l PORT      accept one connection on PORT and do the same
//	vsockcat -local-cid   print this machine's CID
//
// It exits non-zero on any socket error.
package main
