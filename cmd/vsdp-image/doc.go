// Command vsdp-image fetches the guest kernel and builds guest images for
// the VM tests (package images). It is run by make and by scripts.
//
//	vsdp-image kernel [-dir DIR]                  fetch the guest kernel into DIR (build/kernel)
//	vsdp-image build -spec FILE [-kernel DIR] [-dir DIR]
//	                                              build the image a JSON Spec describes; prints its path
//	vsdp-image modules [-kernel DIR] MODULE...    print the module files to load, in order
//	vsdp-image libs FILE...                       print the shared objects the ELF files need
package main
