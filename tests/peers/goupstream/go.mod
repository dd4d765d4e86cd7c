module capgate.dev/tests/peers/goupstream

go 1.26
