// Package runc is the kuasar-runc sandbox kind: Linux namespaces and cgroups
// driven by runc, with no pause container and no shim process.
package runc
