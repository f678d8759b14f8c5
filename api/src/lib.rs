//! HTTP+JSON control API and the `colovmm-remote` client: built in a later issue.
